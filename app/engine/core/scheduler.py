"""The Scheduler: which requests run each step, and what their tokens become. Plain Python, no torch.

It owns the waiting queue and the running rows, admission (`admission.admit`, a pure function),
cancellation, the out-of-memory back-off and the prefix-cache lookups (seen as counts of cached
tokens through `PrefixIndex`, never as K/V). `schedule()` returns a frozen `StepPlan`; a runner
executes it and reports each row's token or error through `update(StepResult)`, which appends the
token to the sequence (text, stops), sends the request its event and finishes it. Modelled on vLLM
v1's `Scheduler.schedule()` / `update_from_output()`; the model-free tests are
tests/unit/engine/test_scheduler_plan.py.

Threads: `add` runs on the callers' threads, everything else on the engine thread; both hold
`lock` (an RLock-based Condition the Engine also waits on) where they touch the queue.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from app.engine.core import admission
from app.engine.core.admission import RequestTooLargeError
from app.engine.core.step import Admit, Drop, Reservation, RowOutput, StepPlan, StepResult, StepStats
from app.engine.core.types import Event, FinishReason, QueueFullError

if TYPE_CHECKING:
    from app.engine.core.sequence import Sequence

log = logging.getLogger("textgen.engine")


class PrefixIndex(Protocol):
    """What the scheduler sees of a prefix cache: counts of token positions, never K/V.

    The runner owns the cache itself (today `prefix_cache.PrefixCache` behind
    `runner.RowPrefixes`; a paged pool can implement the same three members). A position is one
    token's keys and values in every layer, the unit of `admission.Limits.max_batch_tokens`."""

    @property
    def held_tokens(self) -> int:
        """Positions the cache holds now; they count as free (evicted whenever requests need them)."""
        ...

    def cached_tokens(self, seq: "Sequence") -> int:
        """Leading prompt tokens of `seq` the cache holds now (its LRU order unchanged); 0 when the
        request may not use the cache (prompt logprobs of every token)."""
        ...

    def evict_to(self, tokens: int) -> None:
        """Evict what nothing references, least recently used first, until it holds at most `tokens`."""
        ...


class KVUsage(Protocol):
    """The runner's KV memory, as admission counts it: positions allocated now (prefix cache included)."""

    @property
    def allocated(self) -> int: ...


class Scheduler:
    def __init__(
        self,
        limits: admission.Limits,
        max_queue: int,
        memory: KVUsage,
        *,
        max_input_tokens: int,
        prefix: PrefixIndex | None = None,
        release: Callable[["Sequence"], None] = lambda seq: None,
        record: Callable[[StepStats], None] = lambda stats: None,
        lock: threading.Condition | None = None,
    ) -> None:
        """`release(seq)` is called once when a sequence finishes, however it finishes (the
        Engine lets go of its LoRA adapter there). `record(stats)` receives the step's stats
        before the events they count are sent (the Engine records its metrics there)."""
        self.limits = limits
        self.max_queue = max_queue
        self.memory = memory
        self.prefix = prefix
        self._release = release
        self._record = record
        self._outbox: list[tuple[Sequence, Event]] = []  # events built, sent by `deliver`
        self.lock = lock if lock is not None else threading.Condition()
        self.reservation = Reservation(
            limits.max_batch_size,
            limits.max_batch_tokens,
            max(limits.max_prefill_tokens, max_input_tokens),
            limits.layers,
        )
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}  # admitted, not finished; insertion-ordered
        # After a prefill ran out of device memory: admit one request at a time, and none while
        # this many rows (or more) still run, since memory frees only as rows leave.
        self.solo = False
        self.hold_rows: int | None = None
        self._stats = StepStats()

    # --- the callers' side -------------------------------------------------------------------

    def add(self, seq: "Sequence") -> None:
        """Queue `seq`. Raises RequestTooLargeError (413: it can never fit the KV budget) or
        QueueFullError (429: the queue holds `max_queue` and `seq` would not start at the next step)."""
        self.check_fits(seq)
        with self.lock:
            if len(self.waiting) >= self.max_queue and not self._starts_now(seq):
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry later or raise TEXTGEN_MAX_QUEUE"
                )
            self.waiting.append(seq)

    def check_fits(self, seq: "Sequence") -> None:
        """Raise RequestTooLargeError (413) when `seq` could never fit the KV budget, even alone."""
        if not admission.fits_alone(seq, self.limits):
            raise RequestTooLargeError(
                f"the request needs more KV cache than the whole budget: {seq.prompt_len} prompt tokens + "
                f"{seq.request.stopping.max_new_tokens} new tokens do not fit TEXTGEN_MAX_BATCH_TOKENS="
                f"{self.limits.max_batch_tokens}; send a shorter prompt or fewer max_new_tokens"
            )

    def _starts_now(self, seq: "Sequence") -> bool:
        """Whether `seq` would be admitted at the next step, so it needs no room in the queue."""
        plan = admission.admit([*self.waiting, seq], list(self.running), self.limits, self.live_allocated)
        return bool(plan.admitted) and plan.admitted[-1] is seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def live_allocated(self) -> int:
        """KV positions held for requests: everything allocated but the prefix cache's, which is
        evicted whenever requests need the room (so it counts as free, as in vLLM)."""
        return self.memory.allocated - (self.prefix.held_tokens if self.prefix is not None else 0)

    # --- the engine thread --------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan the next step: cancelled rows leave (their events sent now), the waiting requests
        that `admission.admit` picks (less the out-of-memory back-off's hold) are admitted, and the
        prefix cache is evicted to what the step's planned peak leaves free."""
        with self.lock:
            drops = tuple(Drop(s, "cancelled") for s in self.running if s.request.cancelled)
            for drop in drops:
                del self.running[drop.seq]
                self._retire(drop.seq, "cancelled")
            running = list(self.running)
            if self.prefix is not None:  # the prefill bound counts only what the cache does not hold
                for seq in self.waiting:
                    seq.cacheable_tokens = self.prefix.cached_tokens(seq)
            picked = admission.admit(list(self.waiting), running, self.limits, self.live_allocated)
            for seq in picked.cancelled:  # they free their queue slots now
                self._retire(seq, "cancelled")
            admitted, waiting = picked.admitted, picked.waiting
            if self.hold_rows is not None and running and len(running) >= self.hold_rows:
                admitted, waiting = [], [*admitted, *waiting]
            elif self.solo:
                admitted, waiting = admitted[:1], [*admitted[1:], *waiting]
            self.waiting = deque(waiting)
            room = 0
            if self.prefix is not None:
                room = self._room_left(running, admitted)
                self.prefix.evict_to(room)
            now = time.perf_counter()
            for seq in admitted:
                self.running[seq] = None
                seq.admitted = now
                self._stats.queue_times.append(now - seq.arrived)
                self._stats.prompt_tokens += seq.prompt_len
            self.deliver()
            return StepPlan(
                admit=tuple(Admit(s, s.cacheable_tokens if self.prefix is not None else 0) for s in admitted),
                drop=drops,
                decode=bool(running),
                reservation=self.reservation,
                prefix_room=room,
            )

    def _room_left(self, running: list["Sequence"], admitted: list["Sequence"]) -> int:
        """KV positions the budget leaves free at the planned peak of this step and the decode
        steps after it (`admission.peak_tokens` of the running rows and the newcomers)."""
        rows = [*running, *admitted]
        if not rows:
            return self.limits.max_batch_tokens
        peak = admission.peak_tokens(
            len(rows),
            max(s.reserved_tokens for s in rows),
            len(admitted),
            max((s.prompt_len for s in admitted), default=0),
            self.live_allocated if running else 0,
            self.limits.layers,
            self.limits.column_multiple,
        )
        return max(0, self.limits.max_batch_tokens - peak)

    def update(self, result: StepResult) -> list[bool]:
        """Turn a runner's report into events and finishes. Per row of `result.rows`: an error
        fails that request alone; a token is appended (text in context, stop strings) and sent as
        its event, and the request finishes when it stops. Returns, per row, whether it goes on.
        Newcomers a prefill had no memory for are requeued at the head (then admitted one at a
        time, and not while as many rows run), unless one ran alone on an idle engine: it fails."""
        out: list[bool] = []
        if result.out_of_memory:
            self._out_of_memory(list(result.out_of_memory), result.memory_error)
        else:
            if result.prefilled:
                self.solo, self.hold_rows = False, None
            now = time.perf_counter()
            out = [self._advance(row, now) for row in result.rows]
        self._record(result.stats or StepStats())
        self.deliver()
        return out

    def _advance(self, row: RowOutput, now: float) -> bool:
        seq = row.seq
        if row.error is not None or row.token is None:
            self._finish(seq, "error", row.error or "no token was produced for this request")
            return False
        stats = self._stats
        stats.generated_tokens += 1
        if seq.generated:
            stats.itl.append(now - seq.last_token_at)
        else:
            stats.ttft.append(now - seq.arrived)
        seq.last_token_at = now
        token = row.token
        try:
            event = seq.append(token.token_id, token.logprob, token.top)
        except Exception as exc:  # e.g. a tokenizer failure: this request only
            log.warning("request failed while decoding: %s", exc)
            self._finish(seq, "error", f"the generated token could not be decoded ({type(exc).__name__}: {exc})")
            return False
        self._outbox.append((seq, event))
        if not seq.finished:
            return True
        self.running.pop(seq, None)
        self._release(seq)
        assert seq.finish_reason is not None  # finished
        stats.finished.append(seq.finish_reason)
        stats.e2e.append(time.perf_counter() - seq.arrived)
        return False

    def _out_of_memory(self, seqs: list["Sequence"], message: str) -> None:
        for seq in seqs:
            self.running.pop(seq, None)
        running = len(self.running)
        if len(seqs) > 1 or running:
            log.warning("out of memory prefilling %d requests beside %d running: requeued", len(seqs), running)
            self.solo = True
            self.hold_rows = running or None
            with self.lock:
                self.waiting.extendleft(reversed(seqs))
            return
        log.warning("out of memory prefilling one request alone: %s", message)
        self._retire(
            seqs[0], "error", f"out of memory: this request does not fit in device memory even alone ({message})"
        )

    def _finish(self, seq: "Sequence", reason: FinishReason, error: str | None = None) -> None:
        self.running.pop(seq, None)
        self._retire(seq, reason, error)

    def _retire(self, seq: "Sequence", reason: FinishReason, error: str | None = None) -> None:
        """End `seq` early (cancelled, failed, shut down) and send its final event."""
        self._release(seq)
        seq.finish_reason = reason
        if reason == "cancelled":
            self._stats.cancelled += 1
        self._stats.finished.append(reason)
        self._outbox.append((seq, Event(None, "", seq.completion(error=error))))

    def fail_all(self, message: str, reason: FinishReason = "error") -> None:
        """End every waiting and running request with `message` (the engine failed or stopped)."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        running, self.running = list(self.running), {}
        for seq in [*running, *waiting]:
            if not seq.finished:
                self._retire(seq, reason, message)
        self.deliver()

    def deliver(self) -> None:
        """Record the scheduler's stats so far, then send the events built since the last call,
        in order (so a caller that got its event reads metrics that count it)."""
        self._record(self.take_stats())
        outbox, self._outbox = self._outbox, []
        for seq, event in outbox:
            _emit(seq, event)

    def take_stats(self) -> StepStats:
        """What the scheduler counted since the last call (admissions, tokens, finishes)."""
        stats, self._stats = self._stats, StepStats()
        return stats


def _emit(seq: "Sequence", event: Event) -> None:
    try:
        seq.request.on_event(event)
    except Exception:  # a consumer's bug must not stop everyone else's generation
        log.exception("event callback failed")
