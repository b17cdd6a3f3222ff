"""What the HTTP layer serves: settings, the loaded model, the engine and the metrics.

Loading happens after the server starts listening, so /health can answer 503 meanwhile; without
TEXTGEN_MODEL, the first start also builds the offline demo model then (see app/demo_model.py).
"""

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from app.config import Settings
from app.demo_model import BuildProgress, DemoBuild, DemoBuildError, demo_model_ready
from app.engine.core.admission import default_budget, model_layers
from app.engine.core.constraints import GrammarCompiler
from app.engine.engine import Engine
from app.engine.load.loader import LoadedModel, ModelLoadError, load_model
from app.engine.load.selftest import self_test
from app.engine.models.lora import AdapterError, AdapterRegistry
from app.engine.runner.embeddings import Embedder, from_causal_lm, load_sentence_transformer
from app.engine.runner.speculative import SpeculativeConfig
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
    lame_duck: bool = False  # SIGTERM seen: /ready is 503, requests are still admitted
    draining: bool = False  # admission stopped: new requests get 503, in-flight ones finish
    chat_template: str | None = None
    grammars: GrammarCompiler | None = None  # structured output (app/engine/core/constraints.py)
    started: int = field(default_factory=lambda: int(time.time()))
    _hurry: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    build: DemoBuild | None = None  # set while the demo model is being built

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.settings.model or "textgen-demo"

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.accepting and not (self.lame_duck or self.draining)

    @property
    def shutting_down(self) -> bool:
        return self.lame_duck or self.draining

    @property
    def alive(self) -> bool:
        return self.engine is not None and self.engine.alive

    @property
    def building(self) -> BuildProgress | None:
        """The demo model build's progress while it runs, else None."""
        build = self.build
        return build.progress() if build is not None else None

    def playground_url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.settings.port}/"

    def load(self) -> None:
        """Blocking: build the demo model if needed, load the model(s) and start the engine.
        Raises ModelLoadError."""
        s = self.settings
        if s.model is None and not demo_model_ready():
            self.build = DemoBuild()
            if s.ui:
                log.info("the playground at %s shows the build's progress", self.playground_url())
            try:
                self.build.run()
            except DemoBuildError as exc:
                if self.draining:
                    return  # stopped by shutdown: not a failure
                raise ModelLoadError(str(exc)) from exc
            finally:
                self.build = None
        model_id = s.resolved_model()
        if s.torch_threads is not None:
            torch.set_num_threads(s.torch_threads)  # process-wide: the engine thread's GEMMs use it
        if s.compile and (s.lora_adapters or s.allow_runtime_lora):
            # A batch with an adapter's rows runs the eager step, whose bits differ from the compiled
            # one's: a base request's output would depend on its neighbours.
            raise ModelLoadError(
                "TEXTGEN_COMPILE cannot be combined with LoRA adapters (TEXTGEN_LORA_ADAPTERS, "
                "TEXTGEN_ALLOW_RUNTIME_LORA): unset one of them."
            )
        log.info("loading model %s (torch threads: %d)", model_id, torch.get_num_threads())
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
            quantize=s.quantize,
            compile=s.compile,
        )
        self_test(loaded)
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
        max_prefill = max(s.max_prefill_tokens, limits.max_input_tokens)
        layers = model_layers(loaded.model.config)
        engine = Engine(
            loaded,
            embedder,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens
            or default_budget(
                s.max_batch_size, limits.max_total_tokens, max_prefill, layers, loaded.kv_column_multiple
            ),
            max_prefill_tokens=max_prefill,
            max_queue=s.max_queue,
            max_embed_batch=s.max_embed_batch,
            metrics=self.metrics,
            prefix_cache_tokens=s.prefix_cache_max_tokens if s.prefix_cache else 0,
            adapters=self._adapters(loaded),
            speculative=SpeculativeConfig(s.speculative_tokens, s.speculative_ngram_min, s.speculative_ngram_max)
            if s.speculative == "ngram"
            else None,
        )
        engine.start()
        self.metrics.watch(engine, self.model_name, s.max_loras)
        # Everything loaded so far (torch, transformers, the model, the web stack) lives as long as
        # the process: move it out of the collector's reach, so a full collection triggered by a
        # request's many small objects (a 2 MB prompt's token ids) traverses only request objects
        # instead of pausing every thread, the event loop included, for ~0.2 s. vLLM does the same.
        gc.collect()
        gc.freeze()
        self.grammars = GrammarCompiler(
            loaded.tokenizer,
            loaded.model.config.vocab_size,
            sorted(engine.eos_ids),
            on_compile=self.metrics.grammar_compile.observe,
            additional_properties=s.json_additional_properties,
        )
        self.grammars.warm()  # llguidance's view of the vocabulary, built before the first grammar
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
        if s.ui:
            log.info("playground: %s", self.playground_url())

    def _adapters(self, loaded: LoadedModel) -> AdapterRegistry:
        """The LoRA adapter registry, with TEXTGEN_LORA_ADAPTERS loaded. Raises ModelLoadError."""
        s = self.settings
        registry = AdapterRegistry(
            loaded.compact, self.model_name, s.max_loras, s.max_lora_rank, self.metrics.lora_changed
        )
        try:
            wanted = s.lora_adapter_map()
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        for name, path in wanted.items():
            try:
                registry.load(name, path)
            except AdapterError as exc:
                raise ModelLoadError(f"cannot serve LoRA adapter {name}={path}: {exc}") from exc
            log.info("LoRA adapter %s loaded from %s (rank %d)", name, path, registry.get(name).rank)  # type: ignore[union-attr]
        return registry

    def retire(self, lame_duck_s: float) -> bool:
        """Blocking (run it off the event loop): the graceful exit after SIGTERM.

        /ready turns 503 at once, but new requests are still admitted for `lame_duck_s` seconds
        (TEXTGEN_DRAIN_DELAY): a load balancer keeps routing here until its next failed health
        check, and refusing those requests would fail them. Then admission stops and admitted
        requests get TEXTGEN_SHUTDOWN_TIMEOUT seconds to finish. `hurry()` cuts the pause short.
        Returns False when that timeout ran out with requests still running.
        """
        self.lame_duck = True
        if lame_duck_s > 0:
            log.info("lame duck: /ready is 503; still admitting requests for %.1f s", lame_duck_s)
            self._hurry.wait(lame_duck_s)
        self.draining = True
        if self.engine is None:
            return True
        log.info("draining: admission stopped, finishing in-flight requests before exit")
        return self.engine.drain(self.settings.shutdown_timeout)

    def hurry(self) -> None:
        """End the lame-duck pause now (a second signal)."""
        self._hurry.set()

    def shutdown(self) -> None:
        drained = self.draining  # retire() already gave in-flight requests their time
        self.lame_duck = self.draining = True
        build = self.build
        if build is not None:
            build.stop()
        if self.engine is not None:
            if not self.engine.drain(0.0 if drained else self.settings.shutdown_timeout):
                log.warning("shutdown timeout: cancelling requests still running")
            self.engine.stop()
