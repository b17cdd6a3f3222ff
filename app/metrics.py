"""Prometheus metrics, one registry per app so several apps can live in one process (tests)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


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
        self.embedded_inputs = Counter("textgen_embedded_inputs", "Texts embedded", registry=r)
        self.engine_steps = Counter("textgen_engine_steps", "Forward passes run by the engine", ["kind"], registry=r)
