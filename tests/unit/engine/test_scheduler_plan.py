"""The Scheduler without a model (vLLM's tests/v1/core/test_scheduler.py shape): real `Sequence`s
over the GPT-2 tokenizer, a fake KV usage and a fake prefix index; `schedule()` is checked as a
plan and `update()` is fed the rows a runner would report."""

import ast
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.engine.core import scheduler as scheduler_module
from app.engine.core.admission import Limits, RequestTooLargeError
from app.engine.core.scheduler import Scheduler
from app.engine.core.sequence import Sequence
from app.engine.core.step import RowOutput, Sampled, StepResult, StepStats
from app.engine.core.types import Event, GenerationRequest, QueueFullError, SamplingParams, StoppingParams

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))


@dataclass
class Memory:
    allocated: int = 0


@dataclass
class Prefix:
    """A prefix index holding `cached[prompt's first id]` tokens; records every eviction bound."""

    cached: dict[int, int] = field(default_factory=dict)
    held_tokens: int = 0
    evictions: list[int] = field(default_factory=list)

    def cached_tokens(self, seq: Sequence) -> int:
        return self.cached.get(seq.request.prompt_ids[0], 0)

    def evict_to(self, tokens: int) -> None:
        self.evictions.append(tokens)
        self.held_tokens = min(self.held_tokens, tokens)


class Harness:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        limits: Limits,
        max_queue: int = 64,
        prefix: Prefix | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.memory = Memory()
        self.events: dict[str, list[Event]] = {}
        self.released: list[str] = []
        self.recorded: list[StepStats] = []
        self.names: dict[int, str] = {}
        self.scheduler = Scheduler(
            limits,
            max_queue,
            self.memory,
            max_input_tokens=1000,
            prefix=prefix,
            release=lambda seq: self.released.append(self.names[id(seq)]),
            record=self.recorded.append,
        )

    def seq(self, name: str, prompt: list[int] | int = 4, max_new: int = 4, **stopping: object) -> Sequence:
        ids = prompt if isinstance(prompt, list) else [10 + len(self.names)] * prompt
        self.events[name] = []
        request = GenerationRequest(
            ids,
            SamplingParams(),
            StoppingParams(max_new, **stopping),  # type: ignore[arg-type]
            self.events[name].append,
        )
        seq = Sequence(request, self.tokenizer, frozenset({EOS}), frozenset({EOS}), 10_000, torch.device("cpu"))
        self.names[id(seq)] = name
        return seq

    def add(self, *seqs: Sequence) -> None:
        for s in seqs:
            self.scheduler.add(s)

    def name(self, seq: Sequence) -> str:
        return self.names[id(seq)]

    def finish(self, name: str) -> str | None:
        done = [e.completion for e in self.events[name] if e.completion is not None]
        return done[0].finish_reason if done else None


BIG = Limits(max_batch_size=100, max_batch_tokens=10**9, max_prefill_tokens=10**9, layers=4)


def admitted(h: Harness) -> list[str]:
    return [h.name(a.seq) for a in h.scheduler.schedule().admit]


def test_fifo_admits_in_arrival_order_and_a_blocked_head_blocks_the_rest(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, Limits(max_batch_size=100, max_batch_tokens=10**9, max_prefill_tokens=40, layers=4))
    h.add(h.seq("a", 10), h.seq("b", 10), h.seq("long", 30), h.seq("short", 2))
    plan = h.scheduler.schedule()
    assert [h.name(a.seq) for a in plan.admit] == ["a", "b"]
    assert not plan.decode, "nothing ran before this step"
    assert [h.name(s) for s in h.scheduler.waiting] == ["long", "short"], "short does not overtake long"
    assert [h.name(a.seq) for a in h.scheduler.schedule().admit] == ["long"]
    assert admitted(h) == ["short"]


@pytest.mark.parametrize(
    ("limits", "allocated", "expected"),
    [
        (Limits(2, 10**9, 10**9, 4), 0, ["a", "b"]),  # max_batch_size rows
        (Limits(100, 10**9, 2 * 8, 4), 0, ["a", "b"]),  # max_prefill_tokens: newcomers x longest prompt
        (Limits(100, 50, 10**9, 4), 0, ["a", "b"]),  # KV budget: 2 rows x 12 +1/4 copy + 2 x 8 = 46 fit, 3 do not
        (Limits(100, 10**9, 10**9, 4), 0, ["a", "b", "c", "d"]),  # nothing binds
    ],
)
def test_every_budget_binds(
    tokenizer: PreTrainedTokenizerBase, limits: Limits, allocated: int, expected: list[str]
) -> None:
    h = Harness(tokenizer, limits)
    h.memory.allocated = allocated
    h.add(*(h.seq(n, 8) for n in "abcd"))
    assert admitted(h) == expected


def test_the_kv_budget_counts_what_the_running_rows_hold(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, Limits(100, 200, 10**9, 4))
    h.add(h.seq("a", 8))
    assert admitted(h) == ["a"]  # the first request on an idle engine
    h.add(h.seq("b", 8))
    h.memory.allocated = 160  # a's buffers (spare room included)
    assert admitted(h) == [], "160 held + a quarter copy (40) + b's prefill (8) exceed 200"
    h.memory.allocated = 16
    assert admitted(h) == ["b"]


def test_the_first_request_is_admitted_even_above_the_prefill_bound(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, Limits(100, 10**9, 4, 4))
    h.add(h.seq("a", 20), h.seq("b", 20))
    assert admitted(h) == ["a"]
    assert admitted(h) == [], "a runs: b must fit the prefill bound"


def test_a_request_larger_than_the_budget_is_refused_at_submission(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, Limits(100, 30, 10**9, 4))
    with pytest.raises(RequestTooLargeError, match="TEXTGEN_MAX_BATCH_TOKENS=30"):
        h.add(h.seq("huge", 20, max_new=20))
    assert not h.scheduler.waiting


def test_cancelled_requests_leave_queued_or_running(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, BIG)
    a, b, c = h.seq("a"), h.seq("b"), h.seq("c")
    h.add(a, b)
    assert admitted(h) == ["a", "b"]
    h.add(c)
    c.request.cancel()
    a.request.cancel()
    plan = h.scheduler.schedule()
    assert [(h.name(d.seq), d.reason) for d in plan.drop] == [("a", "cancelled")]
    assert plan.admit == () and plan.decode, "b still decodes"
    assert h.finish("a") == h.finish("c") == "cancelled"
    assert h.finish("b") is None
    assert sorted(h.released) == ["a", "c"]
    assert list(h.scheduler.running) == [b] and not h.scheduler.waiting
    assert sum(s.cancelled for s in h.recorded) == 2


def test_update_turns_tokens_into_events_and_finishes(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, BIG)
    a, b, c = h.seq("a", max_new=2), h.seq("b", max_new=5), h.seq("c", max_new=5)
    h.add(a, b, c)
    h.scheduler.schedule()
    hello = tokenizer.encode(" hello")[0]
    going = h.scheduler.update(
        StepResult(
            (
                RowOutput(a, Sampled(hello, -0.5)),
                RowOutput(b, Sampled(EOS, -0.1)),
                RowOutput(c, Sampled(hello, -0.5), "sampling failed for this request (boom)"),
            ),
            prefilled=True,
            stats=StepStats(steps={"prefill": 1}),
        )
    )
    assert going == [True, False, False]
    assert h.events["a"][0].token is not None and h.events["a"][0].token.id == hello
    assert h.finish("b") == "eos_token" and h.finish("c") == "error"
    errors = [e.completion.error for e in h.events["c"] if e.completion is not None]
    assert errors == ["sampling failed for this request (boom)"]
    assert h.scheduler.update(StepResult((RowOutput(a, Sampled(hello, -0.5)),))) == [False]
    assert h.finish("a") == "length"
    assert not h.scheduler.running and sorted(h.released) == ["a", "b", "c"]
    steps = sum(s.steps.get("prefill", 0) for s in h.recorded)
    assert steps == 1 and sum(s.generated_tokens for s in h.recorded) == 3


def test_stats_are_recorded_before_the_events_they_count(tokenizer: PreTrainedTokenizerBase) -> None:
    """A caller that got its last event reads metrics that count it."""
    h = Harness(tokenizer, BIG)
    seen: list[int] = []
    a = h.seq("a", max_new=1)
    a.request.on_event = lambda event: seen.append(sum(s.generated_tokens for s in h.recorded))
    h.add(a)
    h.scheduler.schedule()
    h.scheduler.update(StepResult((RowOutput(a, Sampled(11, -1.0)),)))
    assert seen == [1]


def test_out_of_memory_requeues_then_admits_one_at_a_time(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, BIG)
    r, x, y, z = h.seq("r", max_new=50), h.seq("x"), h.seq("y"), h.seq("z")
    h.add(r)
    assert admitted(h) == ["r"]
    h.scheduler.update(StepResult((RowOutput(r, Sampled(11, -1.0)),), prefilled=True))
    h.add(x, y, z)
    plan = h.scheduler.schedule()
    assert [h.name(a.seq) for a in plan.admit] == ["x", "y", "z"]
    assert h.scheduler.update(StepResult(out_of_memory=(x, y, z), memory_error="injected")) == []
    assert [h.name(s) for s in h.scheduler.waiting] == ["x", "y", "z"], "back at the head, in order"
    assert list(h.scheduler.running) == [r]
    assert admitted(h) == [], "none while as many rows run as when it ran out"
    h.scheduler.update(StepResult((RowOutput(r, Sampled(EOS, -1.0)),)))  # r leaves
    assert admitted(h) == ["x"], "then one at a time"
    h.scheduler.update(StepResult((RowOutput(x, Sampled(11, -1.0)),), prefilled=True))
    assert admitted(h) == ["y", "z"], "a prefill that fits ends the back-off"
    assert all(h.finish(n) is None for n in "xyz")


def test_out_of_memory_alone_on_an_idle_engine_fails_that_request(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, BIG)
    a, b = h.seq("a"), h.seq("b")
    h.add(a)
    admitted(h)
    h.add(b)
    h.scheduler.update(StepResult(out_of_memory=(a,), memory_error="CUDA out of memory"))
    assert h.finish("a") == "error"
    errors = [e.completion.error for e in h.events["a"] if e.completion is not None]
    assert errors[0] is not None and "does not fit in device memory even alone (CUDA out of memory)" in errors[0]
    assert admitted(h) == ["b"], "the engine goes on"


def test_max_queue_zero_takes_what_starts_now_and_refuses_what_would_wait(tokenizer: PreTrainedTokenizerBase) -> None:
    h = Harness(tokenizer, Limits(1, 10**9, 10**9, 4), max_queue=0)
    h.add(h.seq("a"))  # would be admitted at the next step
    with pytest.raises(QueueFullError, match="TEXTGEN_MAX_QUEUE"):
        h.add(h.seq("b"))  # the batch holds one row, taken by a
    assert admitted(h) == ["a"]
    with pytest.raises(QueueFullError):
        h.add(h.seq("c"))  # a runs: c would wait


def test_prefix_hits_shrink_the_prefill_bound_and_the_cache_is_evicted_to_the_room_left(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Prompts of 45 tokens under a prefill bound of 64: one per step uncached; with 32 cached
    each, 4 x 13 fit one step. The cache is then evicted to what the planned peak leaves."""
    for cached, expected in ((0, 1), (32, 4)):
        prefix = Prefix(held_tokens=10**6)
        h = Harness(tokenizer, Limits(8, 2000, 64, 4), prefix=prefix)
        prompts = [[100 + i] + [7] * 44 for i in range(4)]
        prefix.cached = {p[0]: cached for p in prompts}
        h.add(*(h.seq(str(i), prompts[i]) for i in range(4)))
        h.memory.allocated = prefix.held_tokens  # everything held is the cache's: counts as free
        plan = h.scheduler.schedule()
        assert len(plan.admit) == expected
        assert all(a.cached_tokens == cached for a in plan.admit)
        # peak: rows x 49 wide (+ a quarter copy) + newcomers x 45 prompt
        rows = expected
        peak = rows * 49 + -(-rows * 49 // 4) + rows * 45
        assert prefix.evictions == [2000 - peak] == [plan.prefix_room]


def test_n_choices_are_independent_rows(tokenizer: PreTrainedTokenizerBase) -> None:
    """`n > 1` arrives as n requests of the same prompt (app/api): each is its own row, budgeted,
    finished and cancelled alone."""
    h = Harness(tokenizer, Limits(3, 10**9, 10**9, 4))
    prompt = tokenizer.encode("Once upon a time")
    choices = [h.seq(f"n{i}", list(prompt), max_new=3) for i in range(4)]
    h.add(*choices)
    assert admitted(h) == ["n0", "n1", "n2"], "max_batch_size binds across choices"
    choices[1].request.cancel()
    h.scheduler.update(StepResult(tuple(RowOutput(s, Sampled(11, -1.0)) for s in choices[:3])))
    plan = h.scheduler.schedule()
    assert [h.name(d.seq) for d in plan.drop] == ["n1"]
    assert [h.name(a.seq) for a in plan.admit] == ["n3"]
    assert h.finish("n1") == "cancelled" and h.finish("n0") is None


def test_the_scheduler_imports_no_torch() -> None:
    tree = ast.parse(inspect.getsource(scheduler_module))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] in {"torch", "transformers", "numpy"} for name in imported), imported
    for module in ("app.engine.core.step", "app.engine.core.admission", "app.engine.core.types"):
        source = inspect.getsource(__import__(module, fromlist=["_"]))
        assert "import torch" not in source, module
