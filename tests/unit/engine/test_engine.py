"""The engine on a real tiny GPT-2, invariants checked at every step: long runs with rows
joining and leaving, the KV budget, the queue limit, and one failing request among healthy ones."""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import pytest
import torch

from app.engine.core.admission import RequestTooLargeError
from app.engine.core.types import Completion, Event, GenerationRequest, QueueFullError, SamplingParams, StoppingParams
from app.engine.engine import Engine
from app.engine.load.loader import LoadedModel
from app.engine.runner.embeddings import from_causal_lm

WORDS = (
    "the import statement combines two operations it searches for the named module then it binds "
    "the results of that search to a name in the local scope lists are mutable sequences typically "
    "used to store collections of homogeneous items"
).split()


def prompt_ids(lm: LoadedModel, i: int) -> list[int]:
    text = " ".join(WORDS[(i * 7) % len(WORDS) :][: 1 + (i * 5) % 23]) or "the"
    return lm.tokenizer(text)["input_ids"]


def greedy_alone(lm: LoadedModel, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=lm.tokenizer.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


def make_engine(lm: LoadedModel, **overrides: int) -> Engine:
    settings = {"max_batch_size": 4, "max_batch_tokens": 10**6, "max_prefill_tokens": 4096, "max_queue": 64}
    settings.update(overrides)
    engine = Engine(lm, from_causal_lm(lm.model, lm.tokenizer, 255, "tiny"), check_invariants=True, **settings)
    engine.start()
    return engine


class Tracker:
    """Collects each request's events; `done` is set once every submitted request finished."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.completions: dict[int, Completion] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.expected = 0
        self.hooks: dict[tuple[int, int], Callable[[], None]] = {}

    def request(self, key: int, ids: list[int], n: int, sampling: SamplingParams | None = None) -> GenerationRequest:
        self.tokens[key] = []
        self.expected += 1

        def on_event(event: Event) -> None:
            if event.token is not None:
                self.tokens[key].append(event.token.id)
                hook = self.hooks.pop((key, len(self.tokens[key])), None)
                if hook is not None:
                    hook()
            if event.completion is not None:
                with self.lock:
                    self.completions[key] = event.completion
                    if len(self.completions) == self.expected:
                        self.all_done.set()

        return GenerationRequest(ids, sampling or SamplingParams(), StoppingParams(n, min_new_tokens=n), on_event)


def wait_idle(engine: Engine) -> None:
    """The last completion is emitted before the engine frees that batch: wait for it."""
    deadline = time.monotonic() + 10
    while (engine.running or engine.kv.allocated) and time.monotonic() < deadline:
        time.sleep(0.001)


def decode_steps(engine: Engine) -> float:
    return engine.metrics.engine_steps.labels("decode")._value.get()


def test_long_run_with_rows_joining_and_leaving_matches_generate(served_lm: LoadedModel) -> None:
    engine = make_engine(served_lm)
    tracker = Tracker()
    lengths = [20 + (i * 37) % 71 for i in range(16)]  # 20..90 new tokens
    prompts = [prompt_ids(served_lm, i) for i in range(16)]
    try:
        for i in range(3):
            engine.submit(tracker.request(i, prompts[i], lengths[i]))
        # Request i + 3 is submitted from the engine's callback when request i emits its
        # (5 + 3i % 11)-th token, so rows join at many different steps while others leave.
        for i in range(13):
            j = i + 3

            def submit(j: int = j) -> None:
                engine.submit(tracker.request(j, prompts[j], lengths[j]))

            tracker.hooks[(i, 5 + (3 * i) % 11)] = submit
        assert tracker.all_done.wait(120), f"only {len(tracker.completions)} of 16 requests finished"
        assert engine.alive
        assert decode_steps(engine) > 200
        if engine.pool is None:  # the transformers runner's slabs
            assert engine.kv.reallocations > 0  # buffers were copied into new ones while rows decoded
        else:
            assert engine.pool.allocations > 0
            assert engine.pool.copies == 0, "rows joined and left by page table: no K/V was copied"
        wait_idle(engine)
        assert engine.kv.allocated == 0  # every buffer is released once idle
    finally:
        engine.stop()
    for key, ids in enumerate(prompts):
        assert tracker.completions[key].finish_reason == "length"
        assert tracker.tokens[key] == greedy_alone(served_lm, ids, lengths[key]), f"request {key} differs"


@pytest.mark.parametrize(
    ("budget", "max_prefill"),
    [(400, 4096), (700, 64)],  # exact rows only; and room for spare rows
)
def test_peak_kv_allocation_stays_within_budget(served_lm: LoadedModel, budget: int, max_prefill: int) -> None:
    engine = make_engine(served_lm, max_batch_tokens=budget, max_batch_size=8, max_prefill_tokens=max_prefill)
    tracker = Tracker()
    lengths = [5 + (i * 13) % 40 for i in range(20)]
    prompts = [prompt_ids(served_lm, i) for i in range(20)]
    try:
        for i in range(20):
            engine.submit(tracker.request(i, prompts[i], lengths[i]))
        assert tracker.all_done.wait(120)
    finally:
        engine.stop()
    assert engine.kv.peak <= budget
    # Admission plans for every row's whole reservation as a rectangle (rows x the longest); the KV
    # pool hands pages out only as rows grow, so the allocation peaks well below that plan.
    assert engine.kv.peak > budget // 3, "the test should load the cache near its budget"
    for key, ids in enumerate(prompts):
        assert tracker.tokens[key] == greedy_alone(served_lm, ids, lengths[key])


def test_a_request_larger_than_the_budget_is_refused_not_crashed(served_lm: LoadedModel) -> None:
    engine = make_engine(served_lm, max_batch_tokens=50)
    try:
        with pytest.raises(RequestTooLargeError, match="TEXTGEN_MAX_BATCH_TOKENS=50"):
            engine.submit(Tracker().request(0, prompt_ids(served_lm, 3), 60))
        assert engine.alive
    finally:
        engine.stop()


def test_max_queue_zero_means_no_waiting_room(served_lm: LoadedModel) -> None:
    engine = make_engine(served_lm, max_queue=0, max_batch_size=1)
    tracker = Tracker()
    release = threading.Event()
    try:
        # Idle: the request starts at once, so it needs no room in the queue.
        engine.submit(tracker.request(0, prompt_ids(served_lm, 1), 40))
        deadline = time.monotonic() + 10
        while engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        # Busy (one slot, taken): the next one would have to wait, and there is no room.
        with pytest.raises(QueueFullError):
            engine.submit(tracker.request(1, prompt_ids(served_lm, 2), 4))
        tracker.expected -= 1
        release.set()
        assert tracker.all_done.wait(30)
        assert tracker.completions[0].finish_reason == "length"
    finally:
        engine.stop()


def test_one_failing_request_leaves_the_batch_healthy(served_lm: LoadedModel) -> None:
    engine = make_engine(served_lm)
    tracker = Tracker()
    prompts = [prompt_ids(served_lm, i) for i in range(3)]
    # top_logprobs above the vocabulary size makes this row's sampling raise (torch.topk).
    bad = SamplingParams(top_logprobs=len(served_lm.tokenizer) + 10)
    try:
        engine.submit(tracker.request(0, prompts[0], 30))
        engine.submit(tracker.request(1, prompts[1], 30, bad))
        engine.submit(tracker.request(2, prompts[2], 30))
        assert tracker.all_done.wait(60)
        assert engine.alive
        failed = tracker.completions[1]
        assert failed.finish_reason == "error"
        assert failed.error is not None and failed.error.startswith("sampling failed for this request")
        for key in (0, 2):
            assert tracker.completions[key].finish_reason == "length"
            assert tracker.tokens[key] == greedy_alone(served_lm, prompts[key], 30)
        # And the engine goes on serving.
        engine.submit(tracker.request(3, prompts[0], 5))
        tracker.all_done.clear()
        assert tracker.all_done.wait(30)
        assert tracker.tokens[3] == greedy_alone(served_lm, prompts[0], 5)
    finally:
        engine.stop()


def test_a_tokenizer_failure_fails_only_its_request(served_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer raises on one id, present only at the start of one prompt that asks for its
    prompt tokens (decoded one by one at prefill); the rows beside it are untouched."""
    prompts = [prompt_ids(served_lm, i) for i in (4, 5, 6)]
    assert all(len(p) >= 8 for p in prompts)
    bad = max(max(p) for p in prompts) + 1  # an id no prompt holds and no context window sees
    prompts[1] = [bad, *prompts[1]]
    real_decode = served_lm.tokenizer.decode

    def decode(ids: object, *args: object, **kwargs: object) -> str:
        if bad in (ids if isinstance(ids, list) else [ids]):
            raise ValueError(f"cannot decode id {bad}")
        return real_decode(ids, *args, **kwargs)

    monkeypatch.setattr(served_lm.tokenizer, "decode", decode)
    engine = make_engine(served_lm)
    tracker = Tracker()
    try:
        requests = [tracker.request(i, prompts[i], 12) for i in range(3)]
        requests[1].prefill_details = True
        for r in requests:
            engine.submit(r)
        assert tracker.all_done.wait(60)
        assert engine.alive
    finally:
        engine.stop()
    monkeypatch.undo()
    failed = tracker.completions[1]
    assert failed.finish_reason == "error"
    assert failed.error is not None and f"cannot decode id {bad}" in failed.error
    assert "prompt's tokens could not be decoded" in failed.error
    for key in (0, 2):
        assert tracker.completions[key].finish_reason == "length"
        assert tracker.tokens[key] == greedy_alone(served_lm, prompts[key], 12)


def test_out_of_memory_in_prefill_requeues_then_fails_only_that_request(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The device runs out of memory whenever the long prompt is prefilled (fault injected into
    the real model's forward). Beside a running row it waits; alone it fails with a clear error.
    The running row and the request queued behind it finish as `model.generate` would."""
    short, other = prompt_ids(tiny_lm, 1), prompt_ids(tiny_lm, 2)
    long = (prompt_ids(tiny_lm, 3) * 20)[:120]
    real_forward = tiny_lm.model.forward

    def forward(*args: object, **kwargs: object) -> object:
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[1] >= len(long):
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_lm.model, "forward", forward)
    # The transformers forward (the one the fault is injected into), not the compact one.
    engine = make_engine(dataclasses.replace(tiny_lm, compact=None))
    tracker = Tracker()
    caplog.set_level(logging.WARNING, logger="textgen.engine")
    try:
        engine.submit(tracker.request(0, short, 60))
        deadline = time.monotonic() + 10
        while not tracker.tokens[0] and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.submit(tracker.request(1, long, 10))
        engine.submit(tracker.request(2, other, 20))
        assert tracker.all_done.wait(60)
        assert engine.alive
    finally:
        engine.stop()
    monkeypatch.undo()
    failed = tracker.completions[1]
    assert failed.finish_reason == "error"
    assert failed.error is not None and "does not fit in device memory even alone" in failed.error
    assert tracker.completions[0].finish_reason == "length"
    assert tracker.tokens[0] == greedy_alone(tiny_lm, short, 60)
    assert tracker.tokens[2] == greedy_alone(tiny_lm, other, 20)
    messages = [r.getMessage() for r in caplog.records]
    assert any("beside 1 running: requeued" in m for m in messages), messages  # it waited first
