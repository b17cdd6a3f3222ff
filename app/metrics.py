"""Prometheus metrics, one registry per app so several apps can live in one process (tests).

Besides textgen's own names, the load gauges are also exported under the names vLLM uses, which
are the ones inference gateways read (the Gateway API Inference Extension's model-server
protocol, llm-d, KServe): vllm:num_requests_waiting, vllm:num_requests_running,
vllm:kv_cache_usage_perc (vllm:gpu_cache_usage_perc for older endpoint pickers) and
vllm:lora_requests_info. Those are read from the engine when /metrics is scraped.
"""

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineLoad(Protocol):
    """What the load gauges read (app.engine.engine.Engine)."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...
    @property
    def lora_adapters(self) -> tuple[set[str], set[str]]: ...


class LoraInfo(Collector):
    """vllm:lora_requests_info, read from the engine on every scrape: one series whose labels are
    `max_lora` and the comma-joined names of the adapters with running and with waiting requests
    (vLLM's labels, which endpoint pickers read for LoRA affinity); the value is the scrape time.
    No series until `engine` is set (Metrics.watch)."""

    def __init__(self) -> None:
        self.engine: EngineLoad | None = None
        self.max_lora = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters (labels); the value is the time of the last update, so the newest series wins",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        if self.engine is not None:
            running, waiting = self.engine.lora_adapters
            labels = [str(self.max_lora), ",".join(sorted(running)), ",".join(sorted(waiting))]
            family.add_metric(labels, time.time())
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "textgen_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "textgen_request_duration_seconds", "HTTP request duration", ["route"], buckets=_LATENCY, registry=r
        )
        self.prompt_tokens = Counter("textgen_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("textgen_generated_tokens", "Tokens generated", registry=r)
        self.queue_size = Gauge("textgen_queue_size", "Requests waiting to be admitted", registry=r)
        self.batch_size = Gauge("textgen_batch_size", "Sequences in the running batch", registry=r)
        self.ttft = Histogram(
            "textgen_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "textgen_inter_token_latency_seconds", "Time between a request's tokens", buckets=_STEP, registry=r
        )
        self.e2e = Histogram("textgen_e2e_latency_seconds", "Arrival to last token", buckets=_LATENCY, registry=r)
        self.queue_time = Histogram(
            "textgen_queue_time_seconds", "Arrival to admission into the batch", buckets=_LATENCY, registry=r
        )
        self.finished = Counter(
            "textgen_finished_requests", "Generations by finish reason", ["finish_reason"], registry=r
        )
        self.rejected = Counter("textgen_rejected_requests", "Requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter(
            "textgen_cancelled_requests", "Generations cancelled (client gone or timeout)", registry=r
        )
        self.constrained_requests = Counter(
            "textgen_constrained_requests", "Generations with structured output, by kind", ["kind"], registry=r
        )
        self.grammar_compile = Histogram(
            "textgen_grammar_compile_seconds", "Compiling a grammar (cache misses only)", buckets=_STEP, registry=r
        )
        self.grammar_mask = Histogram(
            "textgen_grammar_mask_seconds",
            "Computing and applying the allowed-token masks of one decode step",
            buckets=(0.0001, 0.00025, 0.0005, *_STEP),
            registry=r,
        )
        self.embedded_inputs = Counter("textgen_embedded_inputs", "Texts embedded", registry=r)
        self.engine_steps = Counter("textgen_engine_steps", "Forward passes run by the engine", ["kind"], registry=r)
        # Prefix caching, in prompt tokens (as vLLM v1 counts): hits / queries is the hit rate.
        self.prefix_queries = Counter(
            "textgen_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "textgen_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)", registry=r
        )
        self.vllm_prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (vLLM's name)",
            ["model_name"],
            registry=r,
        )
        self.vllm_prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (vLLM's name)",
            ["model_name"],
            registry=r,
        )
        # Speculative decoding (TEXTGEN_SPECULATIVE), under vLLM's names.
        self.spec_drafts = Counter(
            "vllm:spec_decode_num_drafts",
            "Sequence steps that verified a draft (vLLM's name)",
            ["model_name"],
            registry=r,
        )
        self.spec_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens verified (vLLM's name)", ["model_name"], registry=r
        )
        self.spec_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens",
            "Draft tokens accepted: the chosen token equalled the draft (vLLM's name)",
            ["model_name"],
            registry=r,
        )
        self.model_name = ""
        # Load, read at scrape time: what a gateway routes on.
        self.running_requests = Gauge("textgen_running_requests", "Requests in the running batch", registry=r)
        self.waiting_requests = Gauge("textgen_waiting_requests", "Requests waiting to be admitted", registry=r)
        self.kv_cache_usage = Gauge(
            "textgen_kv_cache_usage_ratio", "KV-cache budget in use (TEXTGEN_MAX_BATCH_TOKENS), 0-1", registry=r
        )
        self.vllm_running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch (vLLM's name)", ["model_name"], registry=r
        )
        self.vllm_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be admitted (vLLM's name)", ["model_name"], registry=r
        )
        self.vllm_kv_cache = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100% (vLLM's name)", ["model_name"], registry=r
        )
        self.vllm_gpu_cache = Gauge(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage, 1 = 100% (vLLM's older name, read by older endpoint pickers)",
            ["model_name"],
            registry=r,
        )
        self.lora_info = LoraInfo()
        r.register(self.lora_info)

        self.lora_loaded = Gauge("textgen_lora_adapters_loaded", "LoRA adapters loaded (unmerged)", registry=r)
        self.lora_requests = Counter(
            "textgen_lora_requests",
            "Generation requests submitted per LoRA adapter (a series lives while its adapter is loaded)",
            ["adapter"],
            registry=r,
        )
        self.lora_load = Histogram(
            "textgen_lora_load_seconds", "Time to read, check and add a LoRA adapter", buckets=_LATENCY, registry=r
        )
        self.lora_unload = Histogram(
            "textgen_lora_unload_seconds",
            "Time to unload a LoRA adapter, waiting for its in-flight requests included",
            buckets=_LATENCY,
            registry=r,
        )

    def lora_changed(self, event: str, name: str, seconds: float) -> None:
        """An adapter was loaded or unloaded (AdapterRegistry's callback)."""
        if event == "load":
            self.lora_loaded.inc()
            self.lora_load.observe(seconds)
        else:
            self.lora_loaded.dec()
            self.lora_unload.observe(seconds)
            try:
                self.lora_requests.remove(name)  # bounded: only loaded adapters keep a series
            except KeyError:
                pass

    def watch(self, engine: EngineLoad, model_name: str, max_lora: int = 0) -> None:
        """Bind the load gauges and vllm:lora_requests_info to `engine` (read on every scrape)."""
        self.running_requests.set_function(lambda: engine.running)
        self.waiting_requests.set_function(lambda: engine.waiting)
        self.kv_cache_usage.set_function(lambda: engine.kv_cache_usage)
        self.vllm_running.labels(model_name).set_function(lambda: engine.running)
        self.vllm_waiting.labels(model_name).set_function(lambda: engine.waiting)
        self.vllm_kv_cache.labels(model_name).set_function(lambda: engine.kv_cache_usage)
        self.vllm_gpu_cache.labels(model_name).set_function(lambda: engine.kv_cache_usage)
        self.lora_info.engine, self.lora_info.max_lora = engine, max_lora
        self.model_name = model_name
        self.vllm_prefix_queries.labels(model_name)  # exported as 0 before the first request
        self.vllm_prefix_hits.labels(model_name)
        for counter in (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens):
            counter.labels(model_name)

    def prefix_cache(self, queries: int, hits: int) -> None:
        """Count one prefix-cache lookup: `queries` prompt tokens, `hits` of them cached."""
        self.prefix_queries.inc(queries)
        self.prefix_hits.inc(hits)
        self.vllm_prefix_queries.labels(self.model_name).inc(queries)
        self.vllm_prefix_hits.labels(self.model_name).inc(hits)

    def speculative(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        """Count one speculative step: `drafts` sequences verified `draft_tokens` draft tokens, of
        which `accepted` were accepted."""
        self.spec_drafts.labels(self.model_name).inc(drafts)
        self.spec_draft_tokens.labels(self.model_name).inc(draft_tokens)
        self.spec_accepted_tokens.labels(self.model_name).inc(accepted)
