"""Automatic prefix caching in the engine, on real tiny models with invariants checked every step:
outputs with the cache equal outputs without it (ids and logprobs, bitwise, in the batch-invariant
default), hits while rows join and leave, prompt logprobs bypassing the cache, and the KV budget
held with the cache full."""

import random
import threading
from pathlib import Path

import pytest

from app.engine.core.types import Completion, Event, GenerationRequest, SamplingParams, StoppingParams
from app.engine.engine import Engine
from app.engine.load.loader import LoadedModel, load_model
from app.engine.runner.embeddings import from_causal_lm
from tests.unit.engine.test_engine import greedy_alone


@pytest.fixture(scope="module", params=["tiny-gpt2", "stories260k"])
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    path: Path = request.getfixturevalue("tiny_gpt2_dir" if request.param == "tiny-gpt2" else "stories260k_dir")
    return load_model(str(path))


def make_engine(lm: LoadedModel, prefix_tokens: int, **overrides: int) -> Engine:
    settings = {"max_batch_size": 4, "max_batch_tokens": 10**6, "max_prefill_tokens": 4096, "max_queue": 64}
    settings.update(overrides)
    embedder = from_causal_lm(lm.model, lm.tokenizer, 255, "tiny")
    engine = Engine(lm, embedder, check_invariants=True, prefix_cache_tokens=prefix_tokens, **settings)
    engine.start()
    return engine


class Runs:
    """Submits requests and collects their completions; `on_token` hooks submit more mid-run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.done: dict[int, Completion] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.hooks: dict[tuple[int, int], tuple[int, list[int], int]] = {}
        self.counts: dict[int, int] = {}

    def submit(self, key: int, ids: list[int], n: int, prefill_details: bool = False) -> None:
        self.counts[key] = 0

        def on_event(event: Event) -> None:
            if event.token is not None:
                self.counts[key] += 1
                hook = self.hooks.pop((key, self.counts[key]), None)
                if hook is not None:
                    self.submit(*hook)
            if event.completion is not None:
                with self.changed:
                    self.done[key] = event.completion
                    self.changed.notify_all()

        stopping = StoppingParams(n, min_new_tokens=n)
        self.engine.submit(GenerationRequest(ids, SamplingParams(), stopping, on_event, prefill_details))

    def wait(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.done) >= count, 120), f"{len(self.done)} of {count} done"


def outputs(c: Completion) -> list[tuple[int, float]]:
    return [(t.id, t.logprob) for t in c.tokens]


def shared_prompts(lm: LoadedModel, count: int, system: int = 37) -> list[list[int]]:
    """`count` prompts that share their first `system` tokens (a system prompt), then differ."""
    rng = random.Random(3)
    vocab = lm.model.config.vocab_size
    head = [rng.randrange(3, vocab) for _ in range(system)]
    return [head + [rng.randrange(3, vocab) for _ in range(2 + (i * 7) % 23)] for i in range(count)]


def test_outputs_with_the_cache_equal_outputs_without_while_rows_join_and_leave(lm: LoadedModel) -> None:
    prompts = shared_prompts(lm, 9)
    prompts.append(list(prompts[4]))  # the same prompt again: every full block but the last token
    lengths = [6 + (i * 11) % 30 for i in range(len(prompts))]
    expected: dict[int, Completion] = {}
    off = make_engine(lm, 0)
    try:
        runs = Runs(off)
        for key, ids in enumerate(prompts):
            runs.submit(key, ids, lengths[key])
        runs.wait(len(prompts))
        expected = runs.done
    finally:
        off.stop()
    on = make_engine(lm, 4096)
    try:
        runs = Runs(on)
        runs.submit(0, prompts[0], lengths[0])
        # Each later request is submitted when the one before emits its 3rd token: it joins a
        # running batch (rows leave as they finish), and finds the system prompt cached.
        for key in range(1, len(prompts)):
            runs.hooks[(key - 1, 3)] = (key, prompts[key], lengths[key])
        runs.wait(len(prompts))
        got = runs.done
        assert on.metrics.engine_steps.labels("prefill")._value.get() >= len(prompts) - 1
    finally:
        on.stop()
    for key in range(len(prompts)):
        assert outputs(got[key]) == outputs(expected[key]), f"request {key} differs with the prefix cache"
        assert expected[key].cached_tokens == 0
    assert got[0].cached_tokens == 0
    assert all(got[key].cached_tokens == 32 for key in range(1, 9)), [c.cached_tokens for c in got.values()]
    assert got[9].cached_tokens == 16 * ((len(prompts[9]) - 1) // 16)
    hits = sum(c.cached_tokens for c in got.values())
    assert on.metrics.prefix_hits._value.get() == hits
    assert on.metrics.prefix_queries._value.get() == sum(len(p) for p in prompts)


def test_a_request_for_prompt_logprobs_bypasses_the_cache(tiny_lm: LoadedModel) -> None:
    ids = shared_prompts(tiny_lm, 1)[0]
    engine = make_engine(tiny_lm, 4096)
    try:
        runs = Runs(engine)
        runs.submit(0, ids, 3)
        runs.wait(1)
        runs.submit(1, ids, 3, prefill_details=True)
        runs.submit(2, ids, 3)
        runs.wait(3)
    finally:
        engine.stop()
    details, plain = runs.done[1], runs.done[2]
    assert details.cached_tokens == 0, "prompt logprobs need every prompt token's logits"
    assert plain.cached_tokens == 32
    assert details.prefill is not None and len(details.prefill) == len(ids)
    assert all(t.logprob == t.logprob for t in details.prefill[1:]), "every prompt token has a logprob"
    assert outputs(details) == outputs(plain) == outputs(runs.done[0])
    assert engine.metrics.prefix_queries._value.get() == 2 * len(ids), "the bypassing request is no query"


def test_live_requests_evict_a_full_cache_and_the_kv_budget_holds(tiny_lm: LoadedModel) -> None:
    budget = 900  # the live load below needs most of it (widths count in whole 64-column chunks)
    engine = make_engine(tiny_lm, 10**6, max_batch_tokens=budget, max_batch_size=8)
    assert engine.prefix is not None
    rng = random.Random(5)
    vocab = tiny_lm.model.config.vocab_size
    try:
        runs = Runs(engine)
        # Distinct 64-token prompts, one at a time: the cache fills up to what the budget leaves.
        fill = [[rng.randrange(3, vocab) for _ in range(64)] for _ in range(12)]
        for key, ids in enumerate(fill):
            runs.submit(key, ids, 1)
            runs.wait(key + 1)
        filled = engine.prefix.tokens
        assert filled > budget // 2, f"the cache should be nearly full, holds {filled}"
        # Then a load that needs most of the budget, half of it sharing a cached prefix.
        shared = shared_prompts(tiny_lm, 16, system=48)
        prompts = [ids if i % 2 else fill[i % len(fill)][:40] + ids[:8] for i, ids in enumerate(shared)]
        lengths = [5 + (i * 13) % 40 for i in range(16)]
        base = len(fill)
        for i, ids in enumerate(prompts):
            runs.submit(base + i, ids, lengths[i])
        runs.wait(base + len(prompts))
    finally:
        engine.stop()
    assert engine.kv.peak <= budget
    cached = [runs.done[base + i].cached_tokens for i in range(16)]
    assert any(cached), "some requests hit the cache"
    assert engine.prefix.tokens < filled, "live requests made the cache give back room"
    for i in range(16):
        c = runs.done[base + i]
        assert [t.id for t in c.tokens] == greedy_alone(tiny_lm, prompts[i], lengths[i]), f"request {i} differs"


def test_the_non_invariant_forward_also_uses_the_cache(tiny_gpt2_dir: Path) -> None:
    """TEXTGEN_BATCH_INVARIANT=false: one attention call over a row's new tokens, so a hit's
    logprobs may differ from a full prefill's in the last bits (docs/design.md, "Prefix caching", gives the tolerance)."""
    lm = load_model(str(tiny_gpt2_dir), batch_invariant=False)
    prompts = shared_prompts(lm, 4)
    done: list[dict[int, Completion]] = []
    for prefix_tokens in (0, 4096):
        engine = make_engine(lm, prefix_tokens)
        try:
            runs = Runs(engine)
            for key, ids in enumerate(prompts):
                runs.submit(key, ids, 12)
                runs.wait(key + 1)
        finally:
            engine.stop()
        done.append(runs.done)
    off, on = done
    assert [on[k].cached_tokens for k in range(4)] == [0, 32, 32, 32]
    for key in range(4):
        assert [t.id for t in on[key].tokens] == [t.id for t in off[key].tokens]
        worst = max(abs(a.logprob - b.logprob) for a, b in zip(on[key].tokens, off[key].tokens, strict=True))
        assert worst <= 1e-5, f"request {key}: logprobs differ by {worst}"


def test_the_prefill_bound_counts_only_tokens_not_cached(tiny_lm: LoadedModel) -> None:
    """TEXTGEN_MAX_PREFILL_TOKENS=64 and prompts of 45 tokens: one prompt per prefill step without
    the cache; with 32 of them cached, 4 x 13 new tokens fit one step."""
    prompts = [ids[:45] for ids in shared_prompts(tiny_lm, 10) if len(ids) >= 45][:5]
    assert len(prompts) == 5
    steps = []
    for prefix_tokens in (0, 4096):
        engine = make_engine(tiny_lm, prefix_tokens, max_prefill_tokens=64, max_batch_size=8)
        try:
            runs = Runs(engine)
            runs.submit(0, prompts[0], 1)
            runs.wait(1)
            before = engine.metrics.engine_steps.labels("prefill")._value.get()
            with engine._cond:  # queued together, so one admission sees them all
                for key in range(1, 5):
                    runs.submit(key, prompts[key], 4)
            runs.wait(5)
            steps.append(engine.metrics.engine_steps.labels("prefill")._value.get() - before)
        finally:
            engine.stop()
        assert all(runs.done[k].cached_tokens == (32 if prefix_tokens else 0) for k in range(1, 5))
    assert steps == [4, 1]


def test_prompts_with_one_token_left_to_prefill_equal_the_uncached_run(lm: LoadedModel) -> None:
    """33-token prompts sharing 32 cached tokens, prefilled together: every row runs one token,
    as in a decode step, yet it is the prompt's last chunk and must get the uncached bits."""
    head = shared_prompts(lm, 1, system=32)[0][:32]
    prompts = [head + [t] for t in (5, 6, 7)]
    done: list[dict[int, Completion]] = []
    for prefix_tokens in (0, 4096):
        engine = make_engine(lm, prefix_tokens)
        try:
            runs = Runs(engine)
            runs.submit(0, prompts[0], 3)
            runs.wait(1)
            with engine._cond:  # queued together: one prefill of two one-token suffixes
                runs.submit(1, prompts[1], 5)
                runs.submit(2, prompts[2], 5)
            runs.wait(3)
        finally:
            engine.stop()
        done.append(runs.done)
    off, on = done
    assert [on[k].cached_tokens for k in range(3)] == [0, 32, 32]
    for key in range(3):
        assert outputs(on[key]) == outputs(off[key]), f"request {key} differs with the prefix cache"
