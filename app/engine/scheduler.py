"""The continuous-batching loop: one thread that admits, prefills, decodes and retires sequences.

Each iteration: drop cancelled sequences, run one batch of waiting embedding requests, prefill
the waiting requests that fit the limits (they join the running batch), then decode one token
for every running sequence. Finished sequences leave at once, so their slots are reused at the
next iteration. Callers talk to it through `submit`/`embed` and callbacks; it knows no HTTP.

Which requests join is decided by `admission.admit`, a pure function with its own tests. An
error that belongs to one request (its sampling settings, its penalties, its tokens failing to
decode) fails that request alone; only a failed forward pass stops the engine, because then no
request can go on. With `check_invariants` (the tests turn it on) the batch and cache invariants
are verified after every step.
"""

import logging
import threading
import time
from collections import deque

import torch

from app.engine import admission
from app.engine import speculative as spec
from app.engine.admission import RequestTooLargeError
from app.engine.batch import Batch
from app.engine.compact_batch import CompactBatch
from app.engine.embeddings import Embedder
from app.engine.invariants import check_batch, check_keep
from app.engine.kv_cache import KVAccount, SlabCache
from app.engine.kv_pool import PAGE_SIZE, KVPool
from app.engine.loader import LoadedModel
from app.engine.lora import AdapterRegistry, UnknownAdapterError
from app.engine.prefix_cache import PrefixCache
from app.engine.sampling import Choice, choose
from app.engine.sequence import Sequence
from app.engine.speculative import SpeculativeConfig
from app.engine.types import (
    EmbedRequest,
    EngineUnavailableError,
    Event,
    FinishReason,
    GenerationRequest,
    QueueFullError,
)
from app.metrics import Metrics

log = logging.getLogger("textgen.engine")


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        embedder: Embedder,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_prefill_tokens: int,
        max_queue: int,
        max_embed_batch: int = 64,
        metrics: Metrics | None = None,
        check_invariants: bool = False,
        prefix_cache_tokens: int = 0,
        adapters: AdapterRegistry | None = None,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.embedder = embedder
        # GPT-2 and Llama run on our compact forward (CompactBatch); other models on HF's (Batch).
        # The two are paired here; the type: ignores where they meet are mypy not seeing that.
        self._forward = loaded.compact if loaded.compact is not None else loaded.model
        self._batch_type = CompactBatch if loaded.compact is not None else Batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.max_embed_batch = max_embed_batch
        self.metrics = metrics or Metrics()
        self.check_invariants = check_invariants
        # Unmerged LoRA adapters by name (compact forward only; empty on the transformers forward).
        self.adapters = adapters if adapters is not None else AdapterRegistry(loaded.compact, loaded.model_id, 0, 0)
        layers = admission.model_layers(self.model.config)
        self.limits = admission.Limits(
            max_batch_size, max_batch_tokens, max_prefill_tokens, layers, loaded.kv_column_multiple
        )
        self.kv = KVAccount(layers)
        # The compact forward's KV cache: one pool of pages for every row and the prefix cache,
        # its budget TEXTGEN_MAX_BATCH_TOKENS in pages (plus each row's partial last page), every
        # page handed out charged to `kv`. The transformers forward keeps its slab cache (Batch).
        self.pool: KVPool | None = None
        if loaded.compact is not None:
            c = loaded.compact
            pages = -(-max_batch_tokens // PAGE_SIZE) + max_batch_size
            self.pool = KVPool(c.layers, c.kv_heads, c.head_dim, c.kv_dtype, c.device, pages, self.kv)
        # Automatic prefix caching (compact forward only: the HF path's left-padded cache has no
        # per-row prefix to reuse): an index of full prompt pages in the pool. Pages no row
        # references stay only within what the live requests' planned peak leaves of the budget
        # (`_prefix_room`), and the pool evicts them when it runs short, so live requests win.
        self.prefix: PrefixCache | None = None
        if self.pool is not None and prefix_cache_tokens > 0:
            self.prefix = PrefixCache(self.pool, prefix_cache_tokens)
        self._prefix_room = 0
        # Exact speculative decoding (app/engine/speculative.py), where the forward can verify exactly.
        self.speculative: SpeculativeConfig | None = None
        self._drafter: spec.Drafter | None = None
        if speculative is not None:
            reason = spec.unsupported_reason(loaded.compact)
            if reason is None:
                self.speculative = speculative
                self._drafter = spec.Drafter(speculative)
            else:
                log.warning("TEXTGEN_SPECULATIVE is off: exact verification is not possible on %s", reason)
        self.eos_ids = frozenset(self._eos_ids())
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._embeds: deque[EmbedRequest] = deque()
        self._batch: Batch | CompactBatch | None = None
        self._prefilling: list[Sequence] = []  # taken from the queue, not yet in the batch
        # After a prefill ran out of device memory: admit one request at a time, and none while
        # this many rows (or more) still run, since memory frees only as rows leave.
        self._solo = False
        self._hold_rows: int | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return []
        return list(ids) if isinstance(ids, list | tuple) else [int(ids)]

    # --- public, called from other threads -------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="textgen-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def accepting(self) -> bool:
        return self.alive and self._accepting

    @property
    def running(self) -> int:
        """Requests admitted and not finished (in the batch or being prefilled to join it)."""
        batch = self._batch
        return (len(batch) if batch is not None else 0) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        """Requests queued for admission."""
        return len(self._waiting)

    @property
    def lora_adapters(self) -> tuple[set[str], set[str]]:
        """Names of the LoRA adapters of running requests, and of waiting ones (vLLM's
        `running_lora_adapters` / `waiting_lora_adapters`). Read from any thread: the copies
        are taken whole under the GIL, and a sequence whose adapter was just released counts
        for neither."""
        running = {seq.adapter.name for seq in list(self._running_seqs()) if seq.adapter is not None}
        waiting = {seq.adapter.name for seq in list(self._waiting) if seq.adapter is not None}
        return running, waiting

    @property
    def kv_cache_usage(self) -> float:
        """The KV cache's share in use, 0 to 1: on the compact forward, pages referenced by rows
        over the pool's budget in pages (prefix-cache pages no row references count as free); on
        the transformers forward, positions allocated (spare capacity included) over
        TEXTGEN_MAX_BATCH_TOKENS."""
        if self.pool is not None and self.pool.max_pages:
            evictable = self.prefix.tokens // PAGE_SIZE if self.prefix is not None else 0
            return min(1.0, (self.pool.used_pages - evictable) / self.pool.max_pages)
        return min(1.0, self._live_allocated() / self.limits.max_batch_tokens)

    def _live_allocated(self) -> int:
        """KV positions held for requests: everything charged but the prefix cache's blocks,
        which are evicted whenever requests need the room (so they count as free, as in vLLM)."""
        return self.kv.allocated - (self.prefix.tokens if self.prefix is not None else 0)

    def _running_seqs(self) -> list[Sequence]:
        batch = self._batch
        return [*(batch.seqs if batch is not None else []), *self._prefilling]

    def submit(self, request: GenerationRequest) -> None:
        """Queue a generation; raises QueueFullError (429), EngineUnavailableError (503) or
        UnknownAdapterError (no adapter `request.adapter` is loaded)."""
        if request.adapter is not None and self.adapters.model is None:
            raise UnknownAdapterError(f"the model '{request.adapter}' does not exist (no adapters are served)")
        adapter = self.adapters.acquire(request.adapter) if request.adapter is not None else None
        if adapter is not None:
            self.metrics.lora_requests.labels(adapter.name).inc()
        seq = Sequence(
            request,
            self.tokenizer,
            self.eos_ids,
            self.special_ids,
            self.loaded.limits.max_total_tokens,
            self.loaded.device,
            adapter,
        )
        try:
            self._enqueue(seq)
        except BaseException:
            self._release_adapter(seq)
            raise

    def _release_adapter(self, seq: Sequence) -> None:
        """Let go of `seq`'s adapter (once), so an unload waiting on it can finish."""
        adapter, seq.adapter = seq.adapter, None
        if adapter is not None:
            self.adapters.release(adapter)

    def _enqueue(self, seq: Sequence) -> None:
        request = seq.request
        if not admission.fits_alone(seq, self.limits):
            self.metrics.rejected.inc()
            raise RequestTooLargeError(
                f"the request needs more KV cache than the whole budget: {seq.prompt_len} prompt tokens + "
                f"{request.stopping.max_new_tokens} new tokens do not fit TEXTGEN_MAX_BATCH_TOKENS="
                f"{self.limits.max_batch_tokens}; send a shorter prompt or fewer max_new_tokens"
            )
        with self._cond:
            self._check_accepting()
            if len(self._waiting) >= self.max_queue and not self._starts_now(seq):
                self.metrics.rejected.inc()
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry later or raise TEXTGEN_MAX_QUEUE"
                )
            self._waiting.append(seq)
            self.metrics.queue_size.set(len(self._waiting))
            self._cond.notify()

    def _starts_now(self, seq: Sequence) -> bool:
        """Whether `seq` would be admitted at the next step, so it needs no room in the queue."""
        plan = admission.admit([*self._waiting, seq], self._running_seqs(), self.limits, self._live_allocated())
        return bool(plan.admitted) and plan.admitted[-1] is seq

    def embed(self, request: EmbedRequest) -> None:
        with self._cond:
            self._check_accepting()
            if len(self._embeds) >= max(self.max_queue, 1):
                self.metrics.rejected.inc()
                raise QueueFullError(f"the embedding queue is full ({self.max_queue} requests waiting)")
            self._embeds.append(request)
            self._cond.notify()

    def _check_accepting(self) -> None:
        if not self.alive:
            raise EngineUnavailableError(f"the engine is not running: {self.error or 'not started'}")
        if not self._accepting:
            raise EngineUnavailableError("the server is shutting down")

    def drain(self, timeout: float) -> bool:
        """Stop admitting new requests and wait up to `timeout` s for admitted ones to finish."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while self._has_work() and self.alive:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def stop(self) -> None:
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop ----------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._waiting or self._embeds or self._batch or self._prefilling)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    embeds = self._take_embeds()
                    newcomers = self._take_admissible()
                    self.metrics.queue_size.set(len(self._waiting))
                with torch.inference_mode():
                    if embeds:
                        self._run_embeds(embeds)
                    self._drop_cancelled()
                    if newcomers:
                        self._prefill(newcomers)
                        self._prefilling = []
                    if self._batch is not None:
                        self._decode(self._batch)
                if self.check_invariants and self._batch is not None:
                    check_batch(self._batch)
                self.metrics.batch_size.set(self.running)
                with self._cond:
                    self._cond.notify_all()  # drain() waits on this
        except Exception as exc:  # a forward pass failed: the engine cannot go on
            log.exception("engine loop died: %s", exc)
            self.error = exc
            self._fail_all(f"engine failure: {exc}")
        finally:
            with self._cond:
                self._cond.notify_all()
            # Left over after a drain timeout (or a stop): cancelled, which callers answer with 503.
            self._fail_all("the server shut down before this request finished (TEXTGEN_SHUTDOWN_TIMEOUT)", "cancelled")

    def _take_embeds(self) -> list[EmbedRequest]:
        taken: list[EmbedRequest] = []
        inputs = 0
        while self._embeds and (not taken or inputs + len(self._embeds[0].token_ids) <= self.max_embed_batch):
            request = self._embeds.popleft()
            inputs += len(request.token_ids)
            taken.append(request)
        return taken

    def _take_admissible(self) -> list[Sequence]:
        """Move the requests `admission.admit` picks from the queue to `_prefilling`."""
        running = self._running_seqs()
        if self.prefix is not None:  # the prefill bound counts only what the cache does not hold
            for seq in self._waiting:
                self._look_up(seq, touch=False)
        plan = admission.admit(list(self._waiting), running, self.limits, self._live_allocated())
        for seq in plan.cancelled:  # they free their queue slots now
            self._retire(seq, "cancelled")
        admitted, waiting = plan.admitted, plan.waiting
        if self._hold_rows is not None and running and len(running) >= self._hold_rows:
            admitted, waiting = [], [*admitted, *waiting]
        elif self._solo:
            admitted, waiting = admitted[:1], [*admitted[1:], *waiting]
        self._waiting = deque(waiting)
        self._prefilling = admitted
        if self.prefix is not None:
            self._prefix_room = self._room_left(running, admitted)
            self.prefix.evict_to(self._prefix_room)
        return admitted

    def _room_left(self, running: list[Sequence], admitted: list[Sequence]) -> int:
        """KV positions the budget leaves free at the planned peak of this step and the decode
        steps after it (`admission.peak_tokens` of the running rows and the newcomers)."""
        live = [s for s in running if not s.request.cancelled]
        rows = [*live, *admitted]
        if not rows:
            return self.limits.max_batch_tokens
        peak = admission.peak_tokens(
            len(rows),
            max(s.reserved_tokens for s in rows),
            len(admitted),
            max((s.prompt_len for s in admitted), default=0),
            self._live_allocated() if live else 0,
            self.limits.layers,
            self.limits.column_multiple,
        )
        return max(0, self.limits.max_batch_tokens - peak)

    def _run_embeds(self, requests: list[EmbedRequest]) -> None:
        inputs = [ids for r in requests for ids in r.token_ids]
        try:
            # One forward for everything; rows are normalised per request afterwards.
            vectors = torch.tensor(self.embedder.embed(inputs, normalize=False))
        except Exception as exc:  # a bad input fails its requests, not the engine
            log.warning("embedding batch failed: %s", exc)
            for r in requests:
                r.on_done(exc)
            return
        self.metrics.engine_steps.labels("embed").inc()
        self.metrics.embedded_inputs.inc(len(inputs))
        start = 0
        for r in requests:
            part = vectors[start : start + len(r.token_ids)]
            start += len(r.token_ids)
            if r.normalize or self.embedder.normalize_module:  # a Normalize module is part of the model
                part = torch.nn.functional.normalize(part, p=2, dim=-1)
            r.on_done(part.tolist())

    def _drop_cancelled(self) -> None:
        batch = self._batch
        if batch is None:
            return
        keep = [i for i, s in enumerate(batch.seqs) if not s.request.cancelled]
        if len(keep) < len(batch):
            for s in batch.seqs:
                if s.request.cancelled:
                    self._retire(s, "cancelled")
            self._batch = self._keep(batch, keep)

    def _keep(self, batch: Batch | CompactBatch, keep: list[int]) -> Batch | CompactBatch | None:
        """`batch` reduced to rows `keep`, or None (its cache freed) when no row is left."""
        if self.check_invariants:
            check_keep(keep, len(batch))
        if not keep:
            self._release(batch)
            return None
        batch.filter(keep)
        return batch

    def _prefill(self, seqs: list[Sequence]) -> None:
        now = time.perf_counter()
        for seq in seqs:
            seq.admitted = now
            self.metrics.queue_time.observe(now - seq.arrived)
            self.metrics.prompt_tokens.inc(seq.prompt_len)
        all_logits = any(s.request.prefill_details for s in seqs)
        batch: Batch | CompactBatch
        try:
            if self.pool is not None:
                prefixes = self._cached_prefixes(seqs) if self.prefix is not None else None
                batch, logits, full = CompactBatch.prefill(self._forward, seqs, all_logits, self.pool, prefixes)  # type: ignore[arg-type]  # compact when the pool is set
                if self.prefix is not None:
                    self._store_prefixes(batch)
            else:
                batch, logits, full = self._batch_type.prefill(self._forward, seqs, all_logits, self.kv)  # type: ignore[arg-type]  # paired in __init__
        except torch.OutOfMemoryError as exc:
            self._prefill_out_of_memory(seqs, exc)
            return
        self._solo, self._hold_rows = False, None
        self.metrics.engine_steps.labels("prefill").inc()
        failed = self._record_prefill(batch, full) if full is not None else {}
        joined = self._keep(batch, self._advance(batch, logits, failed))
        if joined is None:
            return
        if self._batch is None:
            self._batch = joined
        else:
            # Size the buffers for the new reservations before the copy, so it happens once.
            self._reserve(self._batch, [*self._batch.seqs, *joined.seqs])
            self._batch.extend(joined)  # type: ignore[arg-type]  # both are self._batch_type
            self._release(joined)
        self._reserve(self._batch, self._batch.seqs)

    def _cached_prefixes(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each newcomer's pages from the prefix cache (one reference each) (its `cached_tokens` set), counted in the
        hit/query metrics. A request that asked for every prompt token's logprob needs every
        position's logits, so it bypasses the cache (and is not counted); one that asked for them
        from `prefill_details_from` on may use the cache before that."""
        assert self.prefix is not None  # the caller checked
        out: list[list[int]] = []
        for seq in seqs:
            pages = self._look_up(seq, touch=True)
            if not seq.request.prefill_details or seq.request.prefill_details_from:
                self.metrics.prefix_cache(seq.prompt_len, seq.cached_tokens)
            out.append(pages)
        return out

    def _look_up(self, seq: Sequence, touch: bool) -> list[int]:
        """Set `seq.cacheable_tokens` to what the prefix cache holds of its prompt. With `touch`
        (at its prefill), return those pages (one more reference each, for the row), now the most
        recently used, and set `cached_tokens`."""
        assert self.prefix is not None  # the callers checked
        request = seq.request
        if seq.prefix_keys is None:
            # Prompt logprobs need the logits of every position they cover: only the tokens before
            # `prefill_details_from - 1` may come from the cache (prompt_keys leaves out the last).
            ids = request.prompt_ids[: request.prefill_details_from] if request.prefill_details else request.prompt_ids
            seq.prefix_keys = self.prefix.prompt_keys(ids, _prefix_namespace(seq))
        if not touch:
            seq.cacheable_tokens = self.prefix.cached_tokens(seq.prefix_keys)
            return []
        pages = self.prefix.match(seq.prefix_keys)
        seq.cached_tokens = seq.cacheable_tokens = len(pages) * self.prefix.block_size
        return pages

    def _store_prefixes(self, batch: CompactBatch) -> None:
        """Index the full prompt pages of the rows just prefilled (no copy); rows whose prompt
        pages are indexed already (n > 1 choices, twins in one prefill) share those instead."""
        assert self.prefix is not None  # the caller checked
        for row, seq in enumerate(batch.seqs):
            self.prefix.insert(seq.request.prompt_ids, batch.cache.tables[row], _prefix_namespace(seq))

    # The two places the scheduler touches the KV cache's memory, so another batch type adapts here.
    def _reserve(self, batch: Batch | CompactBatch, seqs: list[Sequence]) -> None:
        """Size `batch`'s buffers for the longest reservation among `seqs` at their next copy.

        Spare rows (so joins rarely copy) are allowed up to what the budget holds even at its
        worst: that many rows of this width, plus one layer's copy, plus a full prefill."""
        columns = max(s.reserved_tokens for s in seqs)
        limits = self.limits
        room = limits.max_batch_tokens - max(limits.max_prefill_tokens, self.loaded.limits.max_input_tokens)
        rows = int(room / (columns * (1 + 1 / limits.layers))) if room > 0 else 0
        if isinstance(batch.cache, SlabCache):  # pages need no reservation; only the slab is sized
            batch.cache.columns = columns
            batch.cache.max_rows = min(limits.max_batch_size, rows) if rows > len(seqs) else None

    @staticmethod
    def _release(batch: Batch | CompactBatch) -> None:
        """Free `batch`'s KV buffers (and their charge to the budget account) now."""
        batch.cache.release()

    def _prefill_out_of_memory(self, seqs: list[Sequence], exc: torch.OutOfMemoryError) -> None:
        """The device ran out of memory prefilling `seqs`. If they might fit later (fewer at once,
        or once running rows leave), they go back to the head of the queue; a request that runs
        out of memory alone on an idle engine never fits, and fails. The batch goes on."""
        self._free_device_memory()
        running = len(self._batch) if self._batch is not None else 0
        if len(seqs) > 1 or running:
            log.warning("out of memory prefilling %d requests beside %d running: requeued", len(seqs), running)
            self._solo = True
            self._hold_rows = running or None
            with self._cond:
                self._waiting.extendleft(reversed(seqs))
            return
        log.warning("out of memory prefilling one request alone: %s", exc)
        self._retire(seqs[0], "error", f"out of memory: this request does not fit in device memory even alone ({exc})")

    def _free_device_memory(self) -> None:
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def _record_prefill(self, batch: Batch | CompactBatch, logits: torch.Tensor) -> dict[int, str]:
        """Prompt logprobs (and top candidates) for the sequences that asked for them; return the
        rows whose prompt tokens could not be rendered, with the error (those requests fail alone)."""
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

    def _decode(self, batch: Batch | CompactBatch) -> None:
        drafts = self._drafts(batch)
        try:
            if drafts is None:
                logits = batch.decode(self._forward)  # type: ignore[arg-type]  # paired in __init__
            else:
                logits = spec.verify(batch, self._forward, drafts)  # type: ignore[arg-type]  # compact when drafting
        except torch.OutOfMemoryError as exc:  # these rows fail; the engine serves the next ones
            log.warning("out of memory decoding a batch of %d: %s", len(batch), exc)
            self._batch = None
            self._release(batch)
            self._free_device_memory()
            for seq in batch.seqs:
                self._retire(seq, "error", f"out of memory while decoding: {exc}")
            return
        self.metrics.engine_steps.labels("decode").inc()
        if drafts is None:
            self._batch = self._keep(batch, self._advance(batch, logits))
            return
        keep, accepted = spec.accept(batch, drafts, logits, self._emit_rows(batch))  # type: ignore[arg-type]  # compact when drafting
        assert self._drafter is not None  # drafts come from it
        self._drafter.record(batch.seqs, drafts, accepted)
        self.metrics.speculative(sum(len(d) > 0 for d in drafts), sum(len(d) for d in drafts), sum(accepted))
        self._batch = self._keep(batch, keep)

    def _drafts(self, batch: Batch | CompactBatch) -> list[list[int]] | None:
        """Each row's draft tokens for this step, or None when speculation is off or no row has one."""
        if self._drafter is None:
            return None
        drafts = self._drafter.drafts(batch.seqs)
        return drafts if any(drafts) else None

    def _emit_rows(self, batch: Batch | CompactBatch) -> spec.Emit:
        """`_emit_tokens` for some rows of `batch`: what `spec.accept` calls per draft offset."""

        def emit(rows: list[int], logits: torch.Tensor) -> list[int | None]:
            return self._emit_tokens([batch.seqs[r] for r in rows], logits)

        return emit

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Choice | str]:
        """Every row's next token, or for a row whose settings make sampling fail, the error.

        One batched call normally; if it raises, row by row, so only the culprit fails. Each row
        is computed from its own logits, settings and generator, so the healthy rows get the
        same tokens either way."""
        try:
            return list(choose(logits, seqs, self.metrics.grammar_mask.observe))
        except Exception:
            pass
        out: list[Choice | str] = []
        for row, seq in enumerate(seqs):
            try:
                out.append(choose(logits[row : row + 1], [seq])[0])
            except Exception as exc:
                log.warning("sampling failed for one request: %s", exc)
                out.append(f"sampling failed for this request ({type(exc).__name__}: {exc})")
        return out

    def _advance(
        self, batch: Batch | CompactBatch, logits: torch.Tensor, failed: dict[int, str] | None = None
    ) -> list[int]:
        """Choose and emit each row's next token; return the rows that go on. Rows in `failed`
        (or whose sampling fails) are retired with their error instead."""
        tokens = self._emit_tokens(batch.seqs, logits, failed)
        batch.set_next([0 if t is None else t for t in tokens])
        return [row for row, t in enumerate(tokens) if t is not None]

    def _emit_tokens(
        self, seqs: list[Sequence], logits: torch.Tensor, failed: dict[int, str] | None = None
    ) -> list[int | None]:
        """Choose and emit one token for each of `seqs` (logits: [len(seqs), vocab]); per row the
        token, or None when the row finished or was retired with an error (its own, or `failed`)."""
        choices = self._choose(logits, seqs)
        now = time.perf_counter()
        out: list[int | None] = []
        generated = 0
        for row, (seq, choice) in enumerate(zip(seqs, choices, strict=True)):
            error = choice if isinstance(choice, str) else (failed or {}).get(row)
            if error is not None or isinstance(choice, str):
                out.append(None)  # the row leaves before the next step
                self._retire(seq, "error", error)
                continue
            generated += 1
            if seq.generated:
                self.metrics.itl.observe(now - seq.last_token_at)
            else:
                self.metrics.ttft.observe(now - seq.arrived)
            seq.last_token_at = now
            try:
                event = seq.append(choice.token_id, choice.logprob, choice.top)
            except Exception as exc:  # e.g. a tokenizer failure: this request only
                log.warning("request failed while decoding: %s", exc)
                self._retire(seq, "error", f"the generated token could not be decoded ({type(exc).__name__}: {exc})")
                out.append(None)
                continue
            self._emit(seq, event)
            if seq.finished:
                self._record_finish(seq)
                out.append(None)
            else:
                out.append(choice.token_id)
        self.metrics.generated_tokens.inc(generated)
        return out

    def _record_finish(self, seq: Sequence) -> None:
        self._release_adapter(seq)
        self.metrics.finished.labels(seq.finish_reason).inc()
        self.metrics.e2e.observe(time.perf_counter() - seq.arrived)

    def _retire(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        self._release_adapter(seq)
        seq.finish_reason = reason
        if reason == "cancelled":
            self.metrics.cancelled.inc()
        self.metrics.finished.labels(reason).inc()
        self._emit(seq, Event(None, "", seq.completion(error=error)))

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.request.on_event(event)
        except Exception:  # a consumer's bug must not stop everyone else's generation
            log.exception("event callback failed")

    def _fail_all(self, message: str, reason: FinishReason = "error") -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            embeds, self._embeds = list(self._embeds), deque()
        running = self._batch.seqs if self._batch is not None else []
        prefilling, self._prefilling = self._prefilling, []
        if self._batch is not None:
            self._release(self._batch)
        self._batch = None
        for seq in [*running, *prefilling, *waiting]:
            if not seq.finished:
                self._retire(seq, reason, message)
        for request in embeds:
            request.on_done(RuntimeError(message))
        self.metrics.queue_size.set(0)
        self.metrics.batch_size.set(0)


def _prefix_namespace(seq: Sequence) -> bytes:
    """The prefix cache's namespace for `seq`'s K/V: the base model's (empty) or its adapter's load."""
    return b"" if seq.adapter is None else f"lora:{seq.adapter.load_id}".encode()
