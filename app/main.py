"""The FastAPI application: `create_app(settings)` and its lifespan (load model, run engine)."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.sdk.trace import TracerProvider

from app import __version__
from app.api import anthropic, embed, errors, generate, health, ollama, openai, tokenize, ui
from app.api.content_type import JSONBody
from app.api.middleware import APIKeyAuth, BodyLimit, Observability
from app.config import Settings
from app.engine.load.loader import ModelLoadError
from app.own_thread import on_own_thread
from app.service import Service
from app.tracing import instrument, provider_for

log = logging.getLogger("textgen")


def create_app(
    settings: Settings | None = None,
    on_fatal: Callable[[str], None] | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """`on_fatal` is called with a one-line reason when the model cannot be loaded (the CLI exits).
    `tracer_provider` traces requests with it (tests pass one with an in-memory exporter); by
    default one is made from TEXTGEN_OTLP_ENDPOINT / OTEL_* when they ask for tracing."""
    service = Service(settings or Settings())
    tracer_provider = tracer_provider or provider_for(service.settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(service, on_fatal))
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.to_thread(service.shutdown)
            if tracer_provider is not None:
                await asyncio.to_thread(tracer_provider.shutdown)  # flush the last spans

    app = FastAPI(
        title="textgen",
        version=__version__,
        description="Text generation and embeddings for Hugging Face causal LMs (TGI, TEI, OpenAI and Ollama APIs).",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(embed.router)
    app.include_router(tokenize.router)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    if service.settings.ui:
        ui.mount(app)
    # Outermost last: observability sees every response, CORS answers preflights before auth.
    if tracer_provider is not None:
        instrument(app, tracer_provider)  # first: its stage spans read what the outer ones record
    keys = service.settings.api_keys()
    if keys:
        app.add_middleware(APIKeyAuth, keys=keys, metrics_require_key=service.settings.metrics_require_key)
    app.add_middleware(JSONBody)
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)
    origins = service.settings.cors_origin_list()
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(
        Observability, metrics=service.metrics, router=app.router, log_prompts=service.settings.log_prompts
    )
    return app


async def _load(service: Service, on_fatal: Callable[[str], None] | None) -> None:
    try:
        await on_own_thread(service.load, name="textgen-load")
    except ModelLoadError as exc:
        service.error = str(exc)
    except Exception as exc:  # anything else from deep inside a loader: still one clear line
        service.error = f"{type(exc).__name__}: {exc}"
    if service.error is not None:
        log.error("cannot serve: %s", service.error)
        if on_fatal is not None:
            on_fatal(service.error)
