"""Probes and introspection: /health (liveness), /ready (readiness), /info, /metrics."""

import dataclasses
import os

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__
from app.api.deps import ServiceDep
from app.api.errors import retry_after

router = APIRouter(tags=["operations"])


def _status(ok: bool, detail: str) -> JSONResponse:
    return JSONResponse({"status": "ok" if ok else "unavailable", "detail": detail}, status_code=200 if ok else 503)


@router.get("/health")
async def health(service: ServiceDep) -> JSONResponse:
    """Liveness: 200 while the model is loaded and the engine loop runs; 503 before, or if it died.
    While the demo model is built: 503 `{"status": "building", "detail", "progress": {"phase", "step",
    "total_steps", "fraction", "elapsed_s", "eta_s"}}` (see app/demo_model.py's BuildProgress)."""
    if service.alive:
        return _status(True, "serving")
    building = service.building
    if building is not None:
        body = {"status": "building", "detail": building.detail(), "progress": building.as_json()}
        return JSONResponse(body, status_code=503, headers=retry_after(building.eta_s))
    engine_error = service.engine.error if service.engine is not None else None
    if service.error or engine_error is not None:
        return _status(False, f"engine failed: {service.error or engine_error}")
    loading = _status(False, "loading model")
    loading.headers.update(retry_after(None))
    return loading


@router.get("/ready")
async def ready(service: ServiceDep) -> JSONResponse:
    """Readiness: 200 only when new requests are accepted (not loading, not draining)."""
    if service.ready:
        return _status(True, "accepting requests")
    if service.shutting_down:
        return _status(False, "draining")
    return _status(False, "building the demo model" if service.build is not None else "not ready")


@router.get("/info")
async def info(service: ServiceDep) -> dict:
    """Model, device and limits (TGI's /info fields, plus textgen's)."""
    s = service.settings
    out: dict = {
        "model_id": service.model_name,
        "model_path": s.resolved_model(),
        "version": __version__,
        "max_batch_size": s.max_batch_size,
        "max_queue": s.max_queue,
        "max_concurrent_requests": s.max_batch_size + s.max_queue,
        "max_prefill_tokens": s.max_prefill_tokens,
        "max_stop_sequences": s.max_stop_sequences,
        "max_best_of": s.max_best_of,
        "ready": service.ready,
        "pid": os.getpid(),
    }
    if service.loaded is not None and service.engine is not None:
        lm = service.loaded
        out.update(
            model_dtype=str(lm.dtype).removeprefix("torch."),
            model_device_type=lm.device.type,
            context_length=lm.limits.context_length,
            max_input_tokens=lm.limits.max_input_tokens,
            max_total_tokens=lm.limits.max_total_tokens,
            max_batch_tokens=service.engine.max_batch_tokens,
            prefix_caching=service.engine.prefix is not None,
            prefix_cache_max_tokens=service.engine.prefix.max_tokens if service.engine.prefix is not None else 0,
            embedding_model=service.embedder.model_id if service.embedder else None,
            embedding_dimensions=service.embedder.dimensions if service.embedder else None,
            chat_template=bool(service.chat_template or getattr(lm.tokenizer, "chat_template", None)),
            compile=lm.forward_options.describe_compile() if lm.forward_options is not None else {"enabled": False},
            speculative=None
            if service.engine.speculative is None
            else {"method": "ngram", **dataclasses.asdict(service.engine.speculative)},
        )
    return out


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
