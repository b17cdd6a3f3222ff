"""What the HTTP layer serves: settings, the loaded model, the engine and the metrics.

Loading happens after the server starts listening, so /health can answer 503 meanwhile.
"""

import logging
import time
from dataclasses import dataclass, field

from app.config import Settings
from app.engine.embeddings import Embedder, from_causal_lm, load_sentence_transformer
from app.engine.loader import LoadedModel, ModelLoadError, load_model
from app.engine.scheduler import Engine
from app.metrics import Metrics

log = logging.getLogger("textgen")


@dataclass
class Service:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    embedder: Embedder | None = None
    error: str | None = None
    draining: bool = False
    chat_template: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.settings.model or "textgen-demo"

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.accepting and not self.draining

    @property
    def alive(self) -> bool:
        return self.engine is not None and self.engine.alive

    def load(self) -> None:
        """Blocking: load the model(s) and start the engine. Raises ModelLoadError."""
        s = self.settings
        model_id = s.resolved_model()
        log.info("loading model %s", model_id)
        loaded = load_model(
            model_id,
            device=s.device,
            dtype=s.dtype,
            max_total_tokens=s.max_total_tokens,
            max_input_tokens=s.max_input_tokens,
            adapter=s.adapter,
            compact_forward=s.compact_forward,
            kv_cache_dtype=s.kv_cache_dtype,
            batch_invariant=s.batch_invariant,
        )
        if s.chat_template:
            try:
                self.chat_template = s.chat_template.read_text(encoding="utf-8")
            except OSError as exc:
                raise ModelLoadError(f"cannot read TEXTGEN_CHAT_TEMPLATE {s.chat_template}: {exc}") from exc
        if s.embedding_model:
            try:
                embedder = load_sentence_transformer(s.embedding_model, loaded.device)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot load embedding model {s.embedding_model}: {exc}") from exc
        else:
            embedder = from_causal_lm(loaded.model, loaded.tokenizer, loaded.limits.max_input_tokens, model_id)
        limits = loaded.limits
        engine = Engine(
            loaded,
            embedder,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens or s.max_batch_size * limits.max_total_tokens,
            max_prefill_tokens=max(s.max_prefill_tokens, limits.max_input_tokens),
            max_queue=s.max_queue,
            max_embed_batch=s.max_embed_batch,
            metrics=self.metrics,
        )
        engine.start()
        self.loaded, self.embedder, self.engine = loaded, embedder, engine
        log.info(
            "ready: %s on %s (%s), context %d, max batch %d, forward: %s",
            model_id,
            loaded.device,
            str(loaded.dtype).removeprefix("torch."),
            limits.context_length,
            s.max_batch_size,
            loaded.forward_description,
        )

    def shutdown(self) -> None:
        self.draining = True
        if self.engine is not None:
            if not self.engine.drain(self.settings.shutdown_timeout):
                log.warning("shutdown timeout: cancelling requests still running")
            self.engine.stop()
