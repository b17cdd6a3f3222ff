"""Prompt logprobs from a position on (`GenerationRequest.prefill_details_from`, used by
/v1/decisions): the tokens before it may come from the prefix cache, and the logprobs from it on
are bitwise those of the same request prefilled whole."""

import math
import threading

from app.engine.core.types import Completion, Event, GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel
from tests.unit.engine.test_engine_prefix import make_engine, shared_prompts


def run(engine, ids: list[int], details: bool, start: int = 0) -> Completion:  # noqa: ANN001
    done = threading.Event()
    out: list[Completion] = []

    def on_event(event: Event) -> None:
        if event.completion is not None:
            out.append(event.completion)
            done.set()

    request = GenerationRequest(ids, SamplingParams(), StoppingParams(1), on_event, details)
    request.prefill_details_from = start
    engine.submit(request)
    assert done.wait(120), "no completion"
    return out[0]


def test_logprobs_after_a_cached_prefix_equal_those_of_the_whole_prompt(tiny_lm: LoadedModel) -> None:
    shared = shared_prompts(tiny_lm, 1, system=40)[0][:40]
    option = [5, 9, 11]
    engine = make_engine(tiny_lm, 4096)
    try:
        whole = run(engine, shared + option, details=True)  # no cache: every position run
        assert whole.cached_tokens == 0
        # `whole` stored its 2 full blocks (a bypassing request still stores): the prompt alone hits them.
        assert run(engine, shared, details=False).cached_tokens == 32
        cached = run(engine, shared + option, details=True, start=len(shared))
        limited = run(engine, shared + option, details=True, start=20)  # only 1 block fits before 19
    finally:
        engine.stop()
    assert cached.cached_tokens == 32 and limited.cached_tokens == 16
    assert whole.prefill is not None and cached.prefill is not None and limited.prefill is not None
    tail = [t.logprob for t in whole.prefill[len(shared) :]]
    assert [t.logprob for t in cached.prefill[len(shared) :]] == tail
    assert [t.logprob for t in limited.prefill[len(shared) :]] == tail
    assert all(math.isnan(t.logprob) for t in cached.prefill[:33]), "positions not run have no logprob"
    assert not any(math.isnan(t.logprob) for t in cached.prefill[33:])
    assert engine.metrics.prefix_hits._value.get() == 32 + 32 + 16, "counted as queries and hits"


def test_a_long_prefix_stored_by_a_shorter_prompt_gives_the_same_bits(tiny_lm: LoadedModel) -> None:
    """The K/V of a prompt's full blocks must not depend on the prompt's length: blocks stored by a
    216-token prompt serve a 225-token one with the logprobs it gets uncached. (With each query chunk
    over all the prompt's keys, they differed in the last bits: compact_batch._chunked_attention.)"""
    shared = shared_prompts(tiny_lm, 1, system=216)[0][:216]
    option = [7, 8, 9, 10, 11, 12, 13, 14, 15]
    engine = make_engine(tiny_lm, 4096)
    try:
        whole = run(engine, shared + option, details=True)
        engine.prefix.clear()  # type: ignore[union-attr]  # the prefix cache is on
        run(engine, shared, details=False)
        cached = run(engine, shared + option, details=True, start=len(shared))
    finally:
        engine.stop()
    assert cached.cached_tokens == 208
    assert whole.prefill is not None and cached.prefill is not None
    assert [t.logprob for t in cached.prefill[216:]] == [t.logprob for t in whole.prefill[216:]]
