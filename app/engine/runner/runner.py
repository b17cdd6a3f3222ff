"""Runners execute a `StepPlan`: one per forward, behind one protocol.

- `CompactRunner` (app/engine/runner/compact_runner.py): GPT-2 and Llama on textgen's own forward, a
  `CompactBatch` over a `KVPool` of pages, with the prefix cache and speculative decoding;
- `TransformersRunner` (app/engine/runner/transformers_runner.py): every other `AutoModelForCausalLM`, a
  `Batch` over a left-padded `SlabCache` (this fallback keeps its slab cache behind the protocol).

A runner owns the running batch and its KV buffers, runs the step's forwards (drop, prefill and
join, decode), samples each row's token (`sampling.choose`; a row whose settings make sampling fail
fails alone) and reports every row to the scheduler through `update` (app/engine/core/step.py). It
never decides who runs or what a token means for its request. Only a failed forward raises (the
engine then stops); running out of device memory is reported, never raised.
"""

import dataclasses
import logging
import time
from typing import Generic, Protocol, TypeVar

import torch

from app.engine.core.scheduler import PrefixIndex
from app.engine.core.sequence import Sequence
from app.engine.core.step import Drop, Reservation, RowOutput, Sampled, StepPlan, StepResult, StepStats, Update
from app.engine.kv.kv_cache import KVAccount
from app.engine.kv.kv_pool import KVPool
from app.engine.kv.prefix_cache import PrefixCache
from app.engine.runner.invariants import check_keep
from app.engine.runner.speculative import SpeculativeConfig
from app.engine.sample.sampling import SamplingState, choose

log = logging.getLogger("textgen.engine")


class Runner(Protocol):
    """What the Engine drives. `kv` is the account every KV buffer is charged to (the scheduler's
    `KVUsage`); `prefix_index` what the scheduler sees of the prefix cache (None: no prefix cache)."""

    kv: KVAccount
    pool: KVPool | None  # the compact runner's KV pool of pages; the transformers runner has none
    prefix: PrefixCache | None
    prefix_index: PrefixIndex | None
    speculative: SpeculativeConfig | None

    @property
    def rows(self) -> list[Sequence]:
        """The running batch's sequences, in row order."""
        ...

    def execute(self, plan: StepPlan, update: Update) -> StepStats:
        """Run `plan`: drop its `drop` rows, prefill its `admit` rows and join them, then decode
        every running row; report each row's token or error through `update`, and rows the
        device had no memory for. Each report carries the forward side's stats since the previous
        one (`StepResult.stats`); returns the rest (steps, tokens, timings)."""
        ...

    def check(self) -> None:
        """Assert the batch and cache invariants (app/engine/runner/invariants.py); the tests call it every step."""
        ...

    def release(self) -> None:
        """Drop every row and free the KV buffers now (the engine failed or stopped)."""
        ...


class RunningBatch(Protocol):
    """What the shared runner code uses of `Batch` and `CompactBatch`."""

    seqs: list[Sequence]
    sampling: SamplingState  # the rows' sampling settings, built once, following filter and joins

    def __len__(self) -> int: ...
    def set_next(self, ids: list[int]) -> None: ...
    def filter(self, keep: list[int]) -> None: ...


B = TypeVar("B", bound=RunningBatch)


class BatchRunner(Generic[B]):
    """The step both runners share; subclasses give the forward (`prefill`, `decode`), the join
    (`join`), the buffer sizing (`reserve`), the release (`free`) and the invariants (`check`)."""

    def __init__(self, device: torch.device, kv: KVAccount) -> None:
        self.device = device
        self.kv = kv
        self.batch: B | None = None
        self.pool: KVPool | None = None
        self.prefix: PrefixCache | None = None
        self.prefix_index: PrefixIndex | None = None
        self.speculative: SpeculativeConfig | None = None
        self._stats = StepStats()  # the step's forward-side stats not yet reported

    @property
    def rows(self) -> list[Sequence]:
        batch = self.batch
        return list(batch.seqs) if batch is not None else []

    def execute(self, plan: StepPlan, update: Update) -> StepStats:
        self._stats = StepStats()
        if plan.drop and self.batch is not None:
            self._drop(self.batch, plan.drop)
        if plan.admit:
            self._prefill([a.seq for a in plan.admit], plan, update)
        if self.batch is not None:
            self._decode(self.batch, update)
        rest, self._stats = self._stats, StepStats()
        return rest

    def _report(self, update: Update, result: StepResult) -> list[bool]:
        """`update(result)`, with the stats gathered since the last report."""
        stats, self._stats = self._stats, StepStats()
        return update(dataclasses.replace(result, stats=stats))

    def _drop(self, batch: B, drops: tuple[Drop, ...]) -> None:
        gone = {id(d.seq) for d in drops}
        self.batch = self._keep(batch, [i for i, s in enumerate(batch.seqs) if id(s) not in gone])

    def _keep(self, batch: B, keep: list[int]) -> B | None:
        """`batch` reduced to rows `keep`, or None (its cache freed) when no row is left."""
        check_keep(keep, len(batch))
        if not keep:
            self.free(batch)
            return None
        batch.filter(keep)
        return batch

    def _prefill(self, seqs: list[Sequence], plan: StepPlan, update: Update) -> None:
        start = time.perf_counter()
        all_logits = any(s.request.prefill_details for s in seqs)
        try:
            batch, logits, full = self.prefill(seqs, all_logits, plan.prefix_room)
        except torch.OutOfMemoryError as exc:  # the scheduler requeues them or fails the one
            self._free_device_memory()
            self._report(update, StepResult(out_of_memory=tuple(seqs), memory_error=str(exc)))
            return
        self._stats.count_step("prefill")
        self._stats.prefill_tokens += sum(s.prompt_len - s.cached_tokens for s in seqs)
        failed = self._record_prefill(batch, full) if full is not None else {}
        tokens = self._emit(batch.seqs, batch.sampling, logits, update, failed, prefilled=True)
        batch.set_next([0 if t is None else t for t in tokens])
        joined = self._keep(batch, [row for row, t in enumerate(tokens) if t is not None])
        self._stats.prefill_seconds += time.perf_counter() - start
        if joined is None:
            return
        if self.batch is None:
            self.batch = joined
        else:
            # Size the buffers for the new reservations before the copy, so it happens once.
            self.reserve(self.batch, [*self.batch.seqs, *joined.seqs], plan.reservation)
            self.join(self.batch, joined)
        self.reserve(self.batch, self.batch.seqs, plan.reservation)

    def _decode(self, batch: B, update: Update) -> None:
        start = time.perf_counter()
        try:
            logits = self.decode(batch)
        except torch.OutOfMemoryError as exc:  # these rows fail; the engine serves the next ones
            self._decode_out_of_memory(batch, update, exc)
            return
        self._stats.count_step("decode")
        self._stats.decode_rows += len(batch)
        tokens = self._emit(batch.seqs, batch.sampling, logits, update)
        batch.set_next([0 if t is None else t for t in tokens])
        self.batch = self._keep(batch, [row for row, t in enumerate(tokens) if t is not None])
        self._stats.decode_seconds += time.perf_counter() - start

    def _decode_out_of_memory(self, batch: B, update: Update, exc: torch.OutOfMemoryError) -> None:
        log.warning("out of memory decoding a batch of %d: %s", len(batch), exc)
        self.batch = None
        self.free(batch)
        self._free_device_memory()
        self._report(
            update, StepResult(tuple(RowOutput(s, None, f"out of memory while decoding: {exc}") for s in batch.seqs))
        )

    def _emit(
        self,
        seqs: list[Sequence],
        state: SamplingState,
        logits: torch.Tensor,
        update: Update,
        failed: dict[int, str] | None = None,
        prefilled: bool = False,
    ) -> list[int | None]:
        """Choose a token for each of `seqs` (their sampling `state`; logits: [len(seqs), vocab])
        and report them; per row the token, or None when the row finished or failed (its own
        error, or `failed[row]`)."""
        choices = self._choose(logits, seqs, state)
        failed = failed or {}
        rows = tuple(
            RowOutput(seq, None, choice) if isinstance(choice, str) else RowOutput(seq, choice, failed.get(row))
            for row, (seq, choice) in enumerate(zip(seqs, choices, strict=True))
        )
        going = self._report(update, StepResult(rows, prefilled=prefilled))
        return [r.token.token_id if ok and r.token is not None else None for r, ok in zip(rows, going, strict=True)]

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence], state: SamplingState) -> list[Sampled | str]:
        """Every row's next token, or for a row whose settings make sampling fail, the error.

        One batched call normally; if it raises, row by row, so only the culprit fails. Each row
        is computed from its own logits, settings and generator, so the healthy rows get the
        same tokens either way."""
        try:
            return [
                Sampled(c.token_id, c.logprob, c.top)
                for c in choose(logits, seqs, state, self._stats.grammar_mask.append)
            ]
        except Exception:
            pass
        out: list[Sampled | str] = []
        for row, seq in enumerate(seqs):
            try:
                c = choose(logits[row : row + 1], [seq], state.select([row]))[0]
                out.append(Sampled(c.token_id, c.logprob, c.top))
            except Exception as exc:
                log.warning("sampling failed for one request: %s", exc)
                out.append(f"sampling failed for this request ({type(exc).__name__}: {exc})")
        return out

    @staticmethod
    def _record_prefill(batch: RunningBatch, logits: torch.Tensor) -> dict[int, str]:
        """Prompt logprobs (and top candidates) for the sequences that asked for them; return the
        rows whose prompt tokens could not be rendered, with the error (those requests fail alone).
        `logits`: [rows, longest prompt, vocab], left-padded."""
        failed: dict[int, str] = {}
        width = logits.shape[1]
        for row, seq in enumerate(batch.seqs):
            if not seq.request.prefill_details:
                continue
            ids = seq.request.prompt_ids
            try:
                start = width - len(ids)  # rows are left-padded; position p predicts token p + 1
                rows = torch.log_softmax(logits[row, start : width - 1].float(), dim=-1)
                target = torch.tensor(ids[1:], device=rows.device)[:, None]
                chosen = rows.gather(1, target)[:, 0].clamp(min=-1e4).tolist()
                # Positions from the prefix cache were not run (zero logits): no logprob there.
                chosen[: seq.cached_tokens] = [float("nan")] * min(seq.cached_tokens, len(chosen))
                k = seq.request.sampling.top_logprobs
                top = None
                if k > 0 and len(ids) > 1:
                    values, top_ids = rows.topk(k, dim=-1)
                    top = [
                        list(zip(i, v, strict=True))
                        for i, v in zip(top_ids.tolist(), values.clamp(min=-1e4).tolist(), strict=True)
                    ]
                seq.set_prefill(chosen, top)
            except Exception as exc:  # a tokenizer failure on this prompt: this request only
                log.warning("request failed while rendering its prompt tokens: %s", exc)
                failed[row] = f"the prompt's tokens could not be decoded ({type(exc).__name__}: {exc})"
        return failed

    def _free_device_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self) -> None:
        if self.batch is not None:
            self.free(self.batch)
        self.batch = None

    # --- the forward, per runner (the load-time self-test drives these directly) --------------

    def prefill(
        self, seqs: list[Sequence], all_logits: bool = False, prefix_room: int = 0
    ) -> tuple[B, torch.Tensor, torch.Tensor | None]:
        """Run the prompts of `seqs`: their batch, their last position's logits [rows, vocab] and,
        with `all_logits`, every position's [rows, longest prompt, vocab] (left-padded). A runner
        with a prefix cache uses its hits and stores the new blocks within `prefix_room` positions."""
        raise NotImplementedError

    def decode(self, batch: B) -> torch.Tensor:
        """Feed every row's `next_ids`: next-token logits [rows, vocab]."""
        raise NotImplementedError

    def join(self, batch: B, joined: B) -> None:
        """Append `joined`'s rows to `batch` and free `joined`'s buffers."""
        raise NotImplementedError

    def reserve(self, batch: B, seqs: list[Sequence], reservation: Reservation) -> None:
        """Size `batch`'s buffers for `seqs`' reservations at their next copy."""
        raise NotImplementedError

    def free(self, batch: B) -> None:
        """Free `batch`'s KV buffers (and their charge to the account) now."""
        raise NotImplementedError
