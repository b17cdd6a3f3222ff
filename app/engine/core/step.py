"""What passes between the Scheduler and a Runner in one engine step. Plain Python, no torch.

    Scheduler.schedule() -> StepPlan -> Runner.execute(plan, update) -> StepResult(s) -> Scheduler.update()

The shape follows vLLM v1 (`SchedulerOutput` / `ModelRunnerOutput`): the scheduler decides which
rows run, the runner runs them and samples, the scheduler turns what each row got into events.
One difference: a runner reports its rows through `update` as soon as they are sampled, possibly
several times in one step (the prefill's first tokens, then the decode; a speculative step once per
draft offset), because the next token of a row is chosen from its state after the previous one was
appended (penalties, grammar, `min_new_tokens`, stop strings): that is what keeps speculative
decoding exact (app/engine/runner/speculative.py). `update` answers which rows go on.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engine.core.types import FinishReason

if TYPE_CHECKING:
    from app.engine.core.sequence import Sequence as Seq


@dataclass(frozen=True)
class Admit:
    """A waiting request that is prefilled this step. `cached_tokens`: the leading prompt tokens
    the prefix cache held when it was admitted (the prefill runs the rest; the runner's lookup at
    the prefill is what counts, since eviction between the two may shorten it)."""

    seq: "Seq"
    cached_tokens: int


@dataclass(frozen=True)
class Drop:
    """A running row that leaves the batch before this step's forward (its events are sent)."""

    seq: "Seq"
    reason: FinishReason


@dataclass(frozen=True)
class Reservation:
    """How a runner sizes its KV buffers for a set of rows: `columns(seqs)` cached positions per row
    (the longest reservation, prompt + max_new_tokens), and for a cache that keeps spare rows (so
    joins rarely copy), `spare_rows(seqs)`: the most rows the budget holds at that width even at
    its worst (plus one layer's copy, plus a full prefill), or None when no spare row fits."""

    max_batch_size: int
    max_batch_tokens: int  # the KV budget in cached positions (TEXTGEN_MAX_BATCH_TOKENS)
    headroom: int  # positions kept for one prefill: max(max_prefill_tokens, max_input_tokens)
    layers: int

    @staticmethod
    def columns(seqs: Sequence["Seq"]) -> int:
        return max(s.reserved_tokens for s in seqs)

    def spare_rows(self, seqs: Sequence["Seq"]) -> int | None:
        room = self.max_batch_tokens - self.headroom
        rows = int(room / (self.columns(seqs) * (1 + 1 / self.layers))) if room > 0 else 0
        return min(self.max_batch_size, rows) if rows > len(seqs) else None


@dataclass(frozen=True)
class StepPlan:
    """One step, decided by `Scheduler.schedule()`: the rows that leave first (`drop`), the
    newcomers to prefill and join (`admit`, FIFO order), whether the running batch decodes after
    (`decode`: there are running rows), the buffer sizing rule, and `prefix_room`: the KV positions
    the prefix cache may hold after this step's stores (what the live rows' planned peak leaves)."""

    admit: tuple[Admit, ...]
    drop: tuple[Drop, ...]
    decode: bool
    reservation: Reservation
    prefix_room: int = 0

    @property
    def empty(self) -> bool:
        return not (self.admit or self.drop or self.decode)


@dataclass(frozen=True)
class Sampled:
    """One chosen token: its id, log-probability and, when asked for, the top candidates (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class RowOutput:
    """What one row got: a token, or an error that fails this request alone (then `token` is
    ignored: e.g. its prompt tokens could not be rendered, or its sampling settings failed)."""

    seq: "Seq"
    token: Sampled | None
    error: str | None = None


@dataclass(frozen=True)
class StepResult:
    """A runner's report to `Scheduler.update`: rows that got a token (or an error), or, when a
    prefill ran out of device memory, the newcomers it could not run (`out_of_memory`, with the
    device's message): the scheduler requeues them or, alone on an idle engine, fails them."""

    rows: tuple[RowOutput, ...] = ()
    out_of_memory: tuple["Seq", ...] = ()
    memory_error: str = ""
    prefilled: bool = False  # a prefill ran to completion (ends the out-of-memory back-off)
    # The runner's stats since its previous report: recorded before this report's events are sent,
    # so a caller that got its last event reads metrics that count it (as before the split).
    stats: "StepStats | None" = None


# Scheduler.update: each row in `result.rows` -> whether it goes on (False: finished or failed).
Update = Callable[[StepResult], list[bool]]


@dataclass
class StepStats:
    """What one step did, recorded into the metrics in one place (`app.engine.engine.record_step`).
    Filled by the runner (forward side: it hands them over with each `StepResult` and returns the
    rest from `execute`) and by the scheduler (admissions, tokens, finishes); every field is
    additive, so the parts of one step add up to the step."""

    steps: dict[str, int] = field(default_factory=dict)  # forward passes by kind: prefill, decode, embed
    prefill_tokens: int = 0  # prompt tokens run (cached ones excluded)
    decode_rows: int = 0  # rows decoded (verify rows of drafts excluded)
    prompt_tokens: int = 0  # prompt tokens admitted
    queue_times: list[float] = field(default_factory=list)  # arrival to admission, s
    generated_tokens: int = 0
    ttft: list[float] = field(default_factory=list)  # arrival to first token, s
    itl: list[float] = field(default_factory=list)  # between a request's tokens, s
    e2e: list[float] = field(default_factory=list)  # arrival to finish (finished normally), s
    finished: list[FinishReason] = field(default_factory=list)
    cancelled: int = 0
    prefix: list[tuple[int, int]] = field(default_factory=list)  # per cache query: prompt tokens, cached
    speculative: list[tuple[int, int, int]] = field(default_factory=list)  # per verify: rows, drafted, accepted
    grammar_mask: list[float] = field(default_factory=list)  # seconds per grammar mask
    embedded_inputs: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def count_step(self, kind: str) -> None:
        self.steps[kind] = self.steps.get(kind, 0) + 1
