"""GET /api/version, GET /api/tags, POST /api/show, GET /api/ps: the served model, its loaded LoRA
adapters and (with TEXTGEN_EMBEDDING_MODEL) the embedding model, in Ollama's shapes."""

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter

from app import __version__
from app.api.deps import EngineDep, ServiceDep
from app.api.errors import APIError, validation
from app.api.ollama.convert import resolve_model
from app.api.ollama.protocol import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, ShowRequest
from app.api.openai.chat import chat_template_of
from app.api.openai.tools import template_renders_tools
from app.service import Service

router = APIRouter(tags=["Ollama"])

# The Ollama API level these routes follow (clients such as VS Code's model picker check it).
OLLAMA_API_VERSION = "0.13.0"
NEVER = "9999-12-31T23:59:59Z"  # expires_at: the model stays loaded for the server's lifetime
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_PARAMETERS = f"temperature {DEFAULT_TEMPERATURE}\ntop_k {DEFAULT_TOP_K}\ntop_p {DEFAULT_TOP_P}"


def _human(count: int) -> str:
    """Ollama's parameter_size: 260.1K, 124.4M, 7.2B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _weights(module: torch.nn.Module) -> tuple[int, int]:
    """Parameter count and bytes."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _format(source: str) -> str:
    """Ollama's weight-file format: safetensors for a directory holding them, else transformers'
    own (a .bin checkpoint, or a hub id resolved through the cache)."""
    path = Path(source)
    return "safetensors" if path.is_dir() and any(path.glob("*.safetensors")) else "transformers"


class _Entry:
    """One served name: what /api/tags, /api/ps and /api/show say about it."""

    def __init__(self, service: Service, name: str) -> None:
        assert service.loaded is not None and service.engine is not None and service.embedder is not None
        self.name = name
        self.embedding_only = name != service.model_name and name == service.settings.embedding_model
        adapter = service.engine.adapters.get(name)
        lm = service.loaded
        module = service.embedder.encoder if self.embedding_only else lm.model
        self.config = module.config
        self.count, self.size = _weights(module)
        self.parent = ""
        self.rank = 0
        if adapter is not None:
            self.parent, self.rank = service.model_name, adapter.rank
            tensors = [t for w in adapter.modules.values() for t in (w.a, w.b)]
            self.count = sum(t.numel() for t in tensors)
            self.size = sum(t.numel() * t.element_size() for t in tensors)
        self.family = str(getattr(self.config, "model_type", "unknown"))
        level = lm.quantize.upper() if lm.quantize != "none" else _DTYPES.get(lm.dtype, str(lm.dtype))
        self.details = {
            "parent_model": self.parent,
            "format": _format(service.settings.resolved_model()),
            "family": self.family,
            "families": [self.family],
            "parameter_size": _human(self.count),
            "quantization_level": level,
        }
        source = adapter.path if adapter is not None else f"{service.settings.resolved_model()}\n{service.started}"
        self.digest = hashlib.sha256(f"{name}\n{source}".encode()).hexdigest()
        self.modified_at = datetime.fromtimestamp(service.started, UTC).isoformat().replace("+00:00", "Z")

    def tag(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


def _names(service: Service) -> list[str]:
    assert service.engine is not None
    names = [service.model_name, *service.engine.adapters.names()]
    embedding = service.settings.embedding_model
    if embedding and embedding not in names:
        names.append(embedding)
    return names


@router.get("/api/version")
async def version() -> dict:
    """The Ollama API version these routes follow, and textgen's own."""
    return {"version": OLLAMA_API_VERSION, "textgen_version": __version__}


@router.get("/api/tags")
async def tags(service: ServiceDep, engine: EngineDep) -> dict:
    """The served models, as Ollama lists local models: the base model, each loaded LoRA adapter
    (`details.parent_model` names the base) and a separate embedding model."""
    return {"models": [_Entry(service, name).tag() for name in _names(service)]}


@router.get("/api/ps")
async def ps(service: ServiceDep, engine: EngineDep) -> dict:
    """The loaded models: all of them, loaded until the server stops (`expires_at` far away)."""
    assert service.loaded is not None
    on_gpu = service.loaded.device.type != "cpu"
    models = []
    for name in _names(service):
        entry = _Entry(service, name)
        models.append(
            entry.tag()
            | {
                "expires_at": NEVER,
                "size_vram": entry.size if on_gpu else 0,
                "context_length": service.loaded.limits.max_total_tokens,
            }
        )
    return {"models": models}


@router.post("/api/show")
async def show(body: ShowRequest, service: ServiceDep, engine: EngineDep) -> dict:
    """A served model's details, chat template, defaults and capabilities (`completion`, `tools`
    when its template renders them, `embedding`)."""
    wanted = body.model or body.name
    if not wanted:
        raise validation("`model` is required", "model")
    if body.verbose:  # Ollama's verbose adds GGUF tokenizer arrays, which a transformers model has not
        raise validation("`verbose` is not supported: omit it or send false", "verbose")
    assert service.loaded is not None
    try:
        name = resolve_model(service, wanted)
    except APIError:
        name = resolve_model(service, wanted, embedding=True)
    entry = _Entry(service, name)
    template = "" if entry.embedding_only else chat_template_of(service) or ""
    capabilities = ["embedding"] if entry.embedding_only else ["completion"]
    if template and template_renders_tools(template):
        capabilities.append("tools")
    if not entry.embedding_only and not service.settings.embedding_model:
        capabilities.append("embedding")  # /api/embed pools this model's hidden states
    arch = entry.family
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": entry.count,
        f"{arch}.context_length": service.loaded.limits.context_length,
    }
    hidden = getattr(entry.config, "hidden_size", None) or getattr(entry.config, "n_embd", None)
    if hidden is not None:
        info[f"{arch}.embedding_length"] = hidden
    if entry.rank:
        info["lora.rank"] = entry.rank
    source = entry.parent or service.settings.resolved_model()
    modelfile = f"# Served by textgen {__version__}\nFROM {source}\n"
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    modelfile += "".join(f"PARAMETER {line}\n" for line in _PARAMETERS.splitlines())
    return {
        "modelfile": modelfile,
        "parameters": _PARAMETERS,
        "template": template,
        "details": entry.details,
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": entry.modified_at,
    }
