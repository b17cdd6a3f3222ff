"""Admission without a model: FIFO, the first request, each budget, cancellation."""

from dataclasses import dataclass, field

from app.engine.core.admission import Limits, admit, fits_alone, peak_tokens


@dataclass
class Req:
    cancelled: bool = False


@dataclass
class R:
    name: str
    prompt_len: int = 4
    max_new: int = 4
    request: Req = field(default_factory=Req)
    cached: int = 0  # prompt tokens in the prefix cache

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.max_new

    @property
    def prefill_len(self) -> int:
        return self.prompt_len - self.cached


BIG = Limits(max_batch_size=100, max_batch_tokens=10**9, max_prefill_tokens=10**9, layers=4)


def names(items: list[R]) -> list[str]:
    return [r.name for r in items]


def test_fifo_takes_from_the_head_in_order() -> None:
    waiting = [R("a"), R("b"), R("c")]
    plan = admit(waiting, [], BIG)
    assert names(plan.admitted) == ["a", "b", "c"]
    assert plan.waiting == [] and plan.cancelled == []


def test_a_request_that_does_not_fit_is_not_overtaken() -> None:
    limits = Limits(max_batch_size=100, max_batch_tokens=10**9, max_prefill_tokens=40, layers=1)
    waiting = [R("short", 10), R("long", 30), R("tiny", 1)]
    plan = admit(waiting, [], limits)
    # 2 x 30 > 40: "long" waits, and "tiny" behind it waits too (no overtaking).
    assert names(plan.admitted) == ["short"]
    assert names(plan.waiting) == ["long", "tiny"]


def test_first_request_is_always_admitted_when_idle() -> None:
    tight = Limits(max_batch_size=1, max_batch_tokens=1, max_prefill_tokens=1, layers=1)
    plan = admit([R("huge", 500, 500), R("next")], [], tight)
    assert names(plan.admitted) == ["huge"]
    assert names(plan.waiting) == ["next"]


def test_max_batch_size_binds() -> None:
    limits = Limits(max_batch_size=3, max_batch_tokens=10**9, max_prefill_tokens=10**9)
    plan = admit([R(str(i)) for i in range(5)], [R("running")], limits)
    assert names(plan.admitted) == ["0", "1"]
    assert names(admit([R("x")], [R(str(i)) for i in range(3)], limits).admitted) == []


def test_max_prefill_tokens_binds_on_the_padded_prompts() -> None:
    limits = Limits(max_batch_size=100, max_batch_tokens=10**9, max_prefill_tokens=30)
    plan = admit([R("a", 10), R("b", 5), R("c", 10), R("d", 1)], [R("running")], limits)
    # 3 newcomers padded to 10 = 30 tokens fit; a fourth would be 40.
    assert names(plan.admitted) == ["a", "b", "c"]


def test_max_batch_tokens_binds_on_the_peak() -> None:
    layers = 4
    running = [R("r", 10, 10)]  # reserves 20
    newcomer = R("n", 10, 30)  # reserves 40: the rectangle becomes 2 x 40 = 80
    need = peak_tokens(2, 40, 1, 10, allocated=20, layers=layers)
    assert need == 80 + 20 + 10  # 80 (rectangle) + 80 / 4 (one layer's copy) + 10 (prefill cache)
    at = Limits(max_batch_size=100, max_batch_tokens=need, max_prefill_tokens=10**9, layers=layers)
    below = Limits(max_batch_size=100, max_batch_tokens=need - 1, max_prefill_tokens=10**9, layers=layers)
    assert names(admit([newcomer], running, at, allocated=20).admitted) == ["n"]
    assert names(admit([newcomer], running, below, allocated=20).admitted) == []


def test_a_larger_current_allocation_counts_even_if_the_new_rectangle_is_small() -> None:
    limits = Limits(max_batch_size=100, max_batch_tokens=300, max_prefill_tokens=10**9, layers=2)
    running = [R("r", 2, 2)]
    # The cache still holds 200 positions from rows that left: 200 + 100 + 4 > 300.
    assert admit([R("n", 4, 4)], running, limits, allocated=200).admitted == []
    assert names(admit([R("n", 4, 4)], running, limits, allocated=100).admitted) == ["n"]


def test_cancelled_requests_free_their_slots() -> None:
    limits = Limits(max_batch_size=2, max_batch_tokens=10**9, max_prefill_tokens=10**9)
    gone = R("gone", request=Req(cancelled=True))
    plan = admit([gone, R("a"), R("b")], [], limits)
    assert names(plan.cancelled) == ["gone"]
    assert names(plan.admitted) == ["a", "b"]
    # A cancelled running row is about to leave, so it does not hold a batch slot either.
    running = [R("r1", request=Req(cancelled=True)), R("r2")]
    assert names(admit([R("c")], running, limits).admitted) == ["c"]


def test_an_idle_engine_ignores_a_stale_allocation() -> None:
    limits = Limits(max_batch_size=4, max_batch_tokens=100, max_prefill_tokens=10**9, layers=1)
    assert names(admit([R("a")], [], limits, allocated=10**6).admitted) == ["a"]


def test_fits_alone() -> None:
    limits = Limits(max_batch_size=4, max_batch_tokens=100, max_prefill_tokens=10**9, layers=4)
    # 1 x 60 rectangle + 15 (one layer's copy) + 20 prefill = 95.
    assert fits_alone(R("ok", 20, 40), limits)
    # 1 x 70 + 18 + 20 = 108.
    assert not fits_alone(R("too big", 20, 50), limits)


def test_the_prefill_bound_counts_only_tokens_not_in_the_prefix_cache() -> None:
    limits = Limits(max_batch_size=100, max_batch_tokens=10**9, max_prefill_tokens=100, layers=1)
    cached = [R(str(i), prompt_len=40, cached=32) for i in range(12)]
    assert len(admit(cached, [], limits).admitted) == 12, "12 x 8 new tokens fit 100"
    fresh = [R(str(i), prompt_len=40) for i in range(12)]
    assert len(admit(fresh, [], limits).admitted) == 2, "2 x 40 fit, 3 x 40 do not"
    # The KV bound still counts whole prompts: the prefill's cache holds the cached part too.
    tight = Limits(max_batch_size=100, max_batch_tokens=peak_tokens(2, 44, 2, 40, 0, 1), max_prefill_tokens=100)
    assert len(admit(cached, [], tight).admitted) == 2


def test_widths_count_as_the_cache_allocates_them() -> None:
    # The compact forward's cache allocates widths in whole attention chunks (column_multiple):
    # a row reserving 20 positions holds 64, and a 10-token prefill holds 64 too.
    assert peak_tokens(2, 20, 1, 10, 0, 4, column_multiple=64) == 2 * 64 + 32 + 64
    limits = Limits(max_batch_size=4, max_batch_tokens=100, max_prefill_tokens=10**9, layers=4)
    assert fits_alone(R("ok", 20, 40), limits)
    chunked = Limits(max_batch_size=4, max_batch_tokens=100, max_prefill_tokens=10**9, layers=4, column_multiple=64)
    assert not fits_alone(R("ok", 20, 40), chunked), "64 + 16 + 64 = 144 > 100"
