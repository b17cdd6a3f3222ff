"""OpenTelemetry traces: off by default, on with TEXTGEN_OTLP_ENDPOINT or the standard
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables.

Every HTTP request gets a server span from opentelemetry-instrumentation-fastapi, which honours
an incoming W3C `traceparent` (its parent) and answers nothing different. Generations add, under
that span, one child span per stage the engine timed (`queue`: arrival to admission, `prefill`:
admission to the first token, `decode`: first token to finish) and two events (`first_token`,
`finish`), with token counts as OpenTelemetry GenAI attributes (`gen_ai.usage.input_tokens`,
`gen_ai.usage.output_tokens`). The request's X-Request-ID is the `textgen.request_id` attribute.
The OTEL_* variables the SDK reads (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER,
OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ...) apply as usual; OTEL_SDK_DISABLED=true turns it off.
"""

import os
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api.middleware import REQUEST_ID_KEY, USAGE_KEY
from app.config import Settings
from app.engine.core.types import Completion

# Probes and scrapes would be most of the spans and say nothing (OTEL_PYTHON_FASTAPI_EXCLUDED_URLS overrides).
_EXCLUDED_URLS = "/health$,/ready$,/metrics$"


def exporter_for(settings: Settings) -> SpanExporter | None:
    """The span exporter the settings and OTEL_* variables ask for, or None (tracing off).

    TEXTGEN_OTLP_ENDPOINT `file:///path` writes OTLP JSON lines to that file; another URL is an
    OTLP collector, over HTTP/protobuf (its /v1/traces path is added) unless
    OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL is `grpc`. Unset, an OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT
    turns tracing on with the exporter's own reading of the OTEL_* variables.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = settings.otlp_endpoint
    if not endpoint and not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    if endpoint and endpoint.startswith("file:"):
        from opentelemetry.exporter.otlp.json.file import FileSpanExporter

        path = Path(urlparse(endpoint).path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileSpanExporter(path)
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol.strip() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint) if endpoint else GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if not endpoint:
        return HttpExporter()
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


def provider_for(settings: Settings) -> TracerProvider | None:
    """A TracerProvider batching spans to `exporter_for(settings)`, or None when tracing is off."""
    exporter = exporter_for(settings)
    if exporter is None:
        return None
    attributes = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = "textgen"
    provider = TracerProvider(resource=Resource.create(attributes))  # merges OTEL_RESOURCE_ATTRIBUTES
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def instrument(app: FastAPI, provider: TracerProvider) -> None:
    """Server spans for every route (W3C traceparent honoured), plus the generation stages.
    Call before any other middleware is added: the stage middleware must be the innermost, inside
    the request-id and usage record. (The instrumentor wraps the whole stack when it is built.)"""
    app.add_middleware(GenerationSpans, tracer=provider.get_tracer("textgen"))
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", _EXCLUDED_URLS),
        exclude_spans=["receive", "send"],  # one span per ASGI message would drown a stream's trace
    )


class GenerationSpans:
    """Innermost middleware: once a route has answered, turn its engine timelines (usage record,
    filled by app.api.generation) into child spans and events of the current server span."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            # The server span ends with the last body message, so the stages are added just before.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._annotate(scope)
            await send(message)

        await self.app(scope, receive, send_wrapper)

    def _annotate(self, scope: Scope) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        request_id = scope.get(REQUEST_ID_KEY)
        if request_id:
            span.set_attribute("textgen.request_id", request_id)
        completions = scope.get(USAGE_KEY, {}).get("completions", [])
        if completions:
            self._record(span, completions)

    def _record(self, span: trace.Span, completions: Sequence[Completion]) -> None:
        # Engine times are perf_counter seconds; spans want Unix nanoseconds.
        offset_ns = time.time_ns() - time.perf_counter_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset_ns

        span.set_attribute("gen_ai.usage.input_tokens", sum(c.prompt_tokens for c in completions))
        span.set_attribute("gen_ai.usage.output_tokens", sum(c.generated_tokens for c in completions))
        span.set_attribute("textgen.finish_reasons", [c.finish_reason for c in completions])
        context = trace.set_span_in_context(span)
        for index, c in enumerate(completions):
            t = c.timeline
            if t is None:
                continue
            common = {"textgen.choice": index}
            admitted = t.admitted or t.finished
            self._stage("queue", context, ns(t.arrived), ns(admitted), common)
            if t.admitted and t.first_token:
                self._stage(
                    "prefill",
                    context,
                    ns(t.admitted),
                    ns(t.first_token),
                    {**common, "gen_ai.usage.input_tokens": c.prompt_tokens},
                )
                span.add_event(
                    "first_token", {**common, "textgen.ttft_s": t.first_token - t.arrived}, ns(t.first_token)
                )
                self._stage(
                    "decode",
                    context,
                    ns(t.first_token),
                    ns(t.finished),
                    {**common, "gen_ai.usage.output_tokens": c.generated_tokens},
                )
            span.add_event(
                "finish",
                {
                    **common,
                    "gen_ai.response.finish_reasons": [c.finish_reason],
                    "gen_ai.usage.input_tokens": c.prompt_tokens,
                    "gen_ai.usage.output_tokens": c.generated_tokens,
                },
                ns(t.finished),
            )

    def _stage(self, name: str, context: Context, start_ns: int, end_ns: int, attributes: dict) -> None:
        stage = self.tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes)
        stage.end(end_time=max(start_ns, end_ns))
