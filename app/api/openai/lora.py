"""Runtime LoRA adapters, vLLM's routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Off unless TEXTGEN_ALLOW_RUNTIME_LORA=true, behind the API key like every /v1 route, and paths
only under TEXTGEN_LORA_ROOT (resolved, symlinks included, so `..` cannot leave it). The files are
read on a worker thread, never on the event loop or the engine's thread. Success answers vLLM's
plain-text message.
"""

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, ServiceDep
from app.api.errors import APIError
from app.api.generation import check_refused
from app.api.openai.protocol import OpenAIErrorBody
from app.api.schemas import Refused, RequestModel
from app.engine.models.lora import AdapterExistsError, AdapterLimitError, AdapterRefusedError, UnknownAdapterError
from app.own_thread import on_own_thread
from app.service import Service

router = APIRouter(tags=["OpenAI"])
ERRORS: dict[int | str, dict] = {code: {"model": OpenAIErrorBody} for code in (400, 403, 404, 409, 422)}
UNLOAD_TIMEOUT_S = 300.0  # an unload waits this long for the adapter's in-flight requests


class LoadLoraAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1, max_length=200, description="The name requests send as `model`.")
    lora_path: str = Field(min_length=1, description="Adapter directory, under TEXTGEN_LORA_ROOT (or relative to it).")
    # vLLM's: replace a loaded adapter in place. Refused: unload it first (docs/api.md, "Refused fields").
    load_inplace: Annotated[Any, Refused(lambda v: v is False)] = None


class UnloadLoraAdapterRequest(RequestModel):
    lora_name: str = Field(min_length=1, description="A loaded adapter's name.")
    # vLLM's integer id of an adapter; textgen's adapters have names only.
    lora_int_id: Annotated[Any, Refused()] = None


def _check_enabled(service: Service) -> Path:
    """TEXTGEN_LORA_ROOT, resolved; 403 when runtime loading is off."""
    s = service.settings
    if not s.allow_runtime_lora:
        raise APIError(
            403, "runtime LoRA loading is disabled; start the server with TEXTGEN_ALLOW_RUNTIME_LORA=true", "permission"
        )
    if s.lora_root is None:
        raise APIError(
            403, "runtime LoRA loading needs TEXTGEN_LORA_ROOT (the directory adapters load from)", "permission"
        )
    return s.lora_root.resolve()


def resolve_under(root: Path, path: str) -> Path:
    """`path` (absolute, or relative to `root`) resolved; 400 unless it lies inside `root`, 404
    when nothing is there (vLLM's "No adapter found")."""
    try:
        candidate = (root / path).resolve()  # an absolute `path` replaces root here
        inside = candidate.is_relative_to(root)
        exists = inside and candidate.exists()
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system
        raise APIError(
            400, f"`lora_path` {path[:200]!r} is not a usable path: {exc}", "validation", "lora_path"
        ) from exc
    if not inside:
        raise APIError(
            400, f"`lora_path` must lie under TEXTGEN_LORA_ROOT ({root}); got {path!r}", "validation", "lora_path"
        )
    if not exists:
        raise APIError(404, f"no adapter found at `lora_path` {path!r} ({candidate})", "not_found", "lora_path")
    return candidate


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERRORS)
async def load_lora_adapter(body: LoadLoraAdapterRequest, service: ServiceDep, engine: EngineDep) -> PlainTextResponse:
    """Load a PEFT LoRA adapter (`textgen finetune --lora --no-merge` output) under a name."""
    root = _check_enabled(service)
    check_refused(body)
    path = resolve_under(root, body.lora_path)
    if body.lora_name == service.model_name:
        raise APIError(400, f"`lora_name` {body.lora_name!r} is the base model's name", "validation", "lora_name")
    try:
        # Its own thread: reading and checking weights may run parallel torch ops (app/own_thread.py).
        await on_own_thread(engine.adapters.load, body.lora_name, path, name="textgen-lora-load")
    except AdapterRefusedError as exc:
        raise APIError(400, str(exc), "validation", "lora_path") from exc
    except AdapterExistsError as exc:  # vLLM answers a name loaded twice with 400
        raise APIError(400, str(exc), "validation", "lora_name") from exc
    except AdapterLimitError as exc:
        raise APIError(409, str(exc), "conflict", "lora_name") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERRORS)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, service: ServiceDep, engine: EngineDep
) -> PlainTextResponse:
    """Unload an adapter: new requests for it get 404 at once; the call returns once its
    in-flight requests have finished."""
    _check_enabled(service)
    check_refused(body)
    try:
        await run_in_threadpool(engine.adapters.unload, body.lora_name, UNLOAD_TIMEOUT_S)
    except UnknownAdapterError as exc:
        raise APIError(404, str(exc), "model_not_found", "lora_name") from exc
    except TimeoutError as exc:
        raise APIError(409, f"{exc}; retry the unload later", "conflict", "lora_name") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
