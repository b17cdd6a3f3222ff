"""The Engine: the continuous-batching thread, and the API the service layer calls.

One thread runs the loop; each iteration is one step:

    embeddings (one batch of waiting embedding requests, app/engine/runner/embeddings.py)
    plan   = Scheduler.schedule()                  app/engine/core/scheduler.py: who leaves, who joins
    stats  = Runner.execute(plan, Scheduler.update) compact_runner.py / transformers_runner.py
    record_step(metrics, stats)                    the step's metrics, in one place

Callers talk to it through `submit`/`embed` and callbacks; it knows no HTTP. An error that belongs
to one request fails that request alone; only a failed forward pass stops the engine (then no
request can go on). With `check_invariants` (the tests turn it on) the runner's batch and cache
invariants are verified after every step.
"""

import logging
import threading
import time
from collections import deque

import torch

from app.engine.core import admission
from app.engine.core.scheduler import Scheduler
from app.engine.core.sequence import Sequence
from app.engine.core.step import StepStats
from app.engine.core.types import (
    EmbedRequest,
    EngineError,
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
)
from app.engine.kv.kv_cache import KVAccount
from app.engine.kv.kv_pool import PAGE_SIZE, KVPool
from app.engine.kv.prefix_cache import PrefixCache
from app.engine.load.loader import LoadedModel
from app.engine.load.runners import make_runner
from app.engine.models.lora import AdapterRegistry, UnknownAdapterError
from app.engine.runner.embeddings import Embedder
from app.engine.runner.runner import Runner
from app.engine.runner.speculative import SpeculativeConfig
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
        # The compact runner's KV pool: the budget in pages, plus each row's partial last page.
        kv_pages = -(-max_batch_tokens // PAGE_SIZE) + max_batch_size
        self.runner: Runner = make_runner(loaded, self.kv, prefix_cache_tokens, speculative, kv_pages)
        self._cond = threading.Condition()
        self.scheduler = Scheduler(
            self.limits,
            max_queue,
            self.kv,
            max_input_tokens=loaded.limits.max_input_tokens,
            prefix=self.runner.prefix_index,
            release=self._release_adapter,
            record=lambda stats: record_step(self.metrics, stats),
            lock=self._cond,
        )
        self.eos_ids = frozenset(self._eos_ids())
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self._embeds: deque[EmbedRequest] = deque()
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

    @property
    def prefix(self) -> PrefixCache | None:
        """The prefix cache (None: off, or the transformers forward)."""
        return self.runner.prefix

    @property
    def pool(self) -> KVPool | None:
        """The KV pool of pages (None: the transformers forward, which keeps its slab cache)."""
        return self.runner.pool

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """The speculative-decoding settings in force (None: off, or not exact on this forward)."""
        return self.runner.speculative

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
        """Requests admitted and not finished."""
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        """Requests queued for admission."""
        return len(self.scheduler.waiting)

    @property
    def lora_adapters(self) -> tuple[set[str], set[str]]:
        """Names of the LoRA adapters of running requests, and of waiting ones (vLLM's
        `running_lora_adapters` / `waiting_lora_adapters`). Read from any thread: the copies
        are taken whole under the GIL, and a sequence whose adapter was just released counts
        for neither."""
        running = {seq.adapter.name for seq in list(self.scheduler.running) if seq.adapter is not None}
        waiting = {seq.adapter.name for seq in list(self.scheduler.waiting) if seq.adapter is not None}
        return running, waiting

    @property
    def kv_cache_usage(self) -> float:
        """KV-cache positions allocated now (spare capacity and in-flight prefills included)
        divided by the budget, TEXTGEN_MAX_BATCH_TOKENS; 0 to 1. Cached prefix pages no row
        references count as free. On the compact forward this is the KV pool's pages in use
        (shared pages once) over the budget's pages (TEXTGEN_MAX_BATCH_TOKENS / 16)."""
        return min(1.0, self.scheduler.live_allocated / self.limits.max_batch_tokens)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a generation; raises QueueFullError (429), RequestTooLargeError (413),
        EngineUnavailableError (503) or UnknownAdapterError (no adapter `request.adapter` is loaded)."""
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
            self.scheduler.check_fits(seq)  # 413 before 503: a request that can never run says so
            with self._cond:
                self._check_accepting()
                self.scheduler.add(seq)
                self.metrics.queue_size.set(self.waiting)
                self._cond.notify()
        except EngineError as exc:
            if not isinstance(exc, EngineUnavailableError):
                self.metrics.rejected.inc()
            self._release_adapter(seq)
            raise
        except BaseException:
            self._release_adapter(seq)
            raise

    def _release_adapter(self, seq: Sequence) -> None:
        """Let go of `seq`'s adapter (once), so an unload waiting on it can finish."""
        adapter, seq.adapter = seq.adapter, None
        if adapter is not None:
            self.adapters.release(adapter)

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
        return bool(self._embeds) or self.scheduler.has_work

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        break
                    embeds = self._take_embeds()
                    plan = self.scheduler.schedule()
                    self.metrics.queue_size.set(self.waiting)
                with torch.inference_mode():
                    if embeds:
                        self._run_embeds(embeds)
                    rest = self.runner.execute(plan, self.scheduler.update)
                if self.check_invariants:
                    self.runner.check()
                record_step(self.metrics, rest, self.scheduler.take_stats())
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
        stats = StepStats(embedded_inputs=len(inputs))
        stats.count_step("embed")
        record_step(self.metrics, stats)
        start = 0
        for r in requests:
            part = vectors[start : start + len(r.token_ids)]
            start += len(r.token_ids)
            if r.normalize or self.embedder.normalize_module:  # a Normalize module is part of the model
                part = torch.nn.functional.normalize(part, p=2, dim=-1)
            r.on_done(part.tolist())

    def _fail_all(self, message: str, reason: FinishReason = "error") -> None:
        with self._cond:
            embeds, self._embeds = list(self._embeds), deque()
        self.runner.release()
        self.scheduler.fail_all(message, reason)
        for request in embeds:
            request.on_done(RuntimeError(message))
        self.metrics.queue_size.set(0)
        self.metrics.batch_size.set(0)


def record_step(metrics: Metrics, *parts: StepStats) -> None:
    """Record one step's stats (its parts: embeddings, the runner's, the scheduler's) into the
    Prometheus metrics: the one place the engine loop writes them."""
    for s in parts:
        for kind, count in s.steps.items():
            metrics.engine_steps.labels(kind).inc(count)
        if s.prompt_tokens:
            metrics.prompt_tokens.inc(s.prompt_tokens)
        for seconds in s.queue_times:
            metrics.queue_time.observe(seconds)
        for queries, hits in s.prefix:
            metrics.prefix_cache(queries, hits)
        for seconds in s.grammar_mask:
            metrics.grammar_mask.observe(seconds)
        if s.generated_tokens:
            metrics.generated_tokens.inc(s.generated_tokens)
        for seconds in s.ttft:
            metrics.ttft.observe(seconds)
        for seconds in s.itl:
            metrics.itl.observe(seconds)
        for drafts, draft_tokens, accepted in s.speculative:
            metrics.speculative(drafts, draft_tokens, accepted)
        for reason in s.finished:
            metrics.finished.labels(reason).inc()
        for seconds in s.e2e:
            metrics.e2e.observe(seconds)
        if s.cancelled:
            metrics.cancelled.inc(s.cancelled)
        if s.embedded_inputs:
            metrics.embedded_inputs.inc(s.embedded_inputs)
