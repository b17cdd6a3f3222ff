"""The continuous-batching loop: one thread that admits, prefills, decodes and retires sequences.

Each iteration: drop cancelled sequences, run one batch of waiting embedding requests, prefill
the waiting requests that fit the limits (they join the running batch), then decode one token
for every running sequence. Finished sequences leave at once, so their slots are reused at the
next iteration. Callers talk to it through `submit`/`embed` and callbacks; it knows no HTTP.
"""

import logging
import threading
import time
from collections import deque

import torch

from app.engine.batch import Batch
from app.engine.compact_batch import CompactBatch
from app.engine.embeddings import Embedder
from app.engine.loader import LoadedModel
from app.engine.sampling import choose
from app.engine.sequence import Sequence
from app.engine.types import (
    EmbedRequest,
    EngineUnavailableError,
    Event,
    GenerationRequest,
    QueueFullError,
    Token,
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
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.embedder = embedder
        # GPT-2 and Llama run on our compact forward (CompactBatch); other models on HF's (Batch).
        self._forward = loaded.compact if loaded.compact is not None else loaded.model
        self._batch_type = CompactBatch if loaded.compact is not None else Batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.max_embed_batch = max_embed_batch
        self.metrics = metrics or Metrics()
        self.eos_ids = frozenset(self._eos_ids())
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._embeds: deque[EmbedRequest] = deque()
        self._batch: Batch | CompactBatch | None = None
        self._prefilling: list[Sequence] = []  # taken from the queue, not yet in the batch
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
        batch = self._batch
        return len(batch) if batch is not None else 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a generation; raises QueueFullError (429) or EngineUnavailableError (503)."""
        seq = Sequence(
            request,
            self.tokenizer,
            self.eos_ids,
            self.special_ids,
            self.loaded.limits.max_total_tokens,
            self.loaded.device,
        )
        with self._cond:
            self._check_accepting()
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry later or raise TEXTGEN_MAX_QUEUE"
                )
            self._waiting.append(seq)
            self.metrics.queue_size.set(len(self._waiting))
            self._cond.notify()

    def embed(self, request: EmbedRequest) -> None:
        with self._cond:
            self._check_accepting()
            if len(self._embeds) >= self.max_queue:
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
        return bool(self._waiting or self._embeds or self._batch)

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
                        self._prefilling = newcomers
                        self._prefill(newcomers)
                        self._prefilling = []
                    if self._batch is not None:
                        self._decode(self._batch)
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
            self._fail_all("the server is shutting down")

    def _take_embeds(self) -> list[EmbedRequest]:
        taken: list[EmbedRequest] = []
        inputs = 0
        while self._embeds and (not taken or inputs + len(self._embeds[0].token_ids) <= self.max_embed_batch):
            request = self._embeds.popleft()
            inputs += len(request.token_ids)
            taken.append(request)
        return taken

    def _take_admissible(self) -> list[Sequence]:
        """FIFO admission within the batch-size, prefill-token and KV-token budgets."""
        running = self._batch.seqs if self._batch is not None else []
        if any(s.request.cancelled for s in self._waiting):  # free their queue slots now
            for seq in [s for s in self._waiting if s.request.cancelled]:
                self._waiting.remove(seq)
                self._retire(seq, "cancelled")
        taken: list[Sequence] = []
        longest_prompt = 0
        longest_reserved = max((s.reserved_tokens for s in running), default=0)
        while self._waiting:
            seq = self._waiting[0]
            count = len(running) + len(taken) + 1
            prompt = max(longest_prompt, seq.prompt_len)
            reserved = max(longest_reserved, seq.reserved_tokens)
            first = not running and not taken
            if count > self.max_batch_size:
                break
            if not first and (
                (len(taken) + 1) * prompt > self.max_prefill_tokens or count * reserved > self.max_batch_tokens
            ):
                break
            self._waiting.popleft()
            taken.append(seq)
            longest_prompt, longest_reserved = prompt, reserved
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
        self.metrics.engine_steps.labels("embed").inc()
        self.metrics.embedded_inputs.inc(len(inputs))
        start = 0
        for r in requests:
            part = vectors[start : start + len(r.token_ids)]
            start += len(r.token_ids)
            if r.normalize:
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
        """`batch` reduced to rows `keep`, or None when no row is left."""
        if not keep:
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
        batch, logits, full = self._batch_type.prefill(self._forward, seqs, all_logits)  # type: ignore[arg-type]
        self.metrics.engine_steps.labels("prefill").inc()
        if full is not None:
            self._record_prefill(batch, full)
        joined = self._keep(batch, self._advance(batch, logits))
        if joined is None:
            return
        if self._batch is None:
            self._batch = joined
        else:
            self._batch.extend(joined)

    def _record_prefill(self, batch: Batch | CompactBatch, logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        width = logits.shape[1]
        for row, seq in enumerate(batch.seqs):
            if not seq.request.prefill_details:
                continue
            ids = seq.request.prompt_ids
            offset = width - len(ids)
            tokens = [Token(ids[0], self.tokenizer.decode([ids[0]]), float("nan"), ids[0] in self.special_ids)]
            for i in range(1, len(ids)):
                lp = float(logprobs[row, offset + i - 1, ids[i]])
                special = ids[i] in self.special_ids
                tokens.append(Token(ids[i], self.tokenizer.decode([ids[i]]), lp, special))
            seq.prefill = tokens

    def _decode(self, batch: Batch | CompactBatch) -> None:
        logits = batch.decode(self._forward)  # type: ignore[arg-type]
        self.metrics.engine_steps.labels("decode").inc()
        self._batch = self._keep(batch, self._advance(batch, logits))

    def _advance(self, batch: Batch | CompactBatch, logits: torch.Tensor) -> list[int]:
        """Choose and emit each row's next token; return the rows that go on."""
        choices = choose(logits, batch.seqs, sorted(self.eos_ids))
        now = time.perf_counter()
        keep: list[int] = []
        for row, (seq, choice) in enumerate(zip(batch.seqs, choices, strict=True)):
            if seq.generated:
                self.metrics.itl.observe(now - seq.last_token_at)
            else:
                self.metrics.ttft.observe(now - seq.arrived)
            seq.last_token_at = now
            try:
                event = seq.append(choice.token_id, choice.logprob, choice.top)
            except Exception as exc:  # e.g. a tokenizer failure: this request only
                log.warning("request failed while decoding: %s", exc)
                seq.finish_reason = "error"
                self._emit(seq, Event(None, "", seq.completion(error=str(exc))))
                continue
            self._emit(seq, event)
            if seq.finished:
                self._record_finish(seq)
            else:
                keep.append(row)
        self.metrics.generated_tokens.inc(len(choices))
        batch.set_next([c.token_id for c in choices])
        return keep

    def _record_finish(self, seq: Sequence) -> None:
        self.metrics.finished.labels(seq.finish_reason).inc()
        self.metrics.e2e.observe(time.perf_counter() - seq.arrived)

    def _retire(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason  # type: ignore[assignment]
        if reason == "cancelled":
            self.metrics.cancelled.inc()
        self.metrics.finished.labels(reason).inc()
        self._emit(seq, Event(None, "", seq.completion(error=error)))

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.request.on_event(event)
        except Exception:  # a consumer's bug must not stop everyone else's generation
            log.exception("event callback failed")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            embeds, self._embeds = list(self._embeds), deque()
        running = self._batch.seqs if self._batch is not None else []
        prefilling, self._prefilling = self._prefilling, []
        self._batch = None
        for seq in [*running, *prefilling, *waiting]:
            if not seq.finished:
                self._retire(seq, "error", message)
        for request in embeds:
            request.on_done(RuntimeError(message))
        self.metrics.queue_size.set(0)
        self.metrics.batch_size.set(0)
