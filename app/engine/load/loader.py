"""Load one causal LM and its tokenizer, resolve device/dtype and the token limits it allows."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.engine.kv.kv_pool import PAGE_SIZE
from app.engine.load.mapped_pages import module_storages, page_out_stale
from app.engine.models import CompactModel, compact_model
from app.engine.models.quantize import Quantize, QuantizeUnavailable, quantize_model
from app.engine.runner.forward_options import ForwardOptions

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A model that cannot be served; the message says what was tried and what to do."""


@dataclass
class Limits:
    context_length: int
    max_total_tokens: int
    max_input_tokens: int


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    device: torch.device
    dtype: torch.dtype
    limits: Limits
    compact: CompactModel | None = None  # our forward (GPT-2, Llama), else the HF model's
    quantize: Quantize = "none"  # TEXTGEN_QUANTIZE: int8/int4 linear layers (app/engine/models/quantize.py)
    # How the compact runner runs `compact` (batch invariance, KV dtype, compiled step): set exactly
    # when `compact` is.
    forward_options: ForwardOptions | None = None

    @property
    def kv_column_multiple(self) -> int:
        """The KV cache allocates row widths in multiples of this (admission budgets them so): the
        compact forward's pool in whole pages, the transformers forward's cache exactly."""
        return PAGE_SIZE if self.compact is not None else 1

    @property
    def forward_description(self) -> str:
        """Which forward serves generation, for the startup log."""
        c, o = self.compact, self.forward_options
        weights = "" if self.quantize == "none" else f", weights {self.quantize}"
        if c is None or o is None:
            return f"transformers{f' ({weights[2:]})' if weights else ''}"
        kv = str(o.kv_dtype).removeprefix("torch.")
        return f"compact {c.family} (batch-invariant: {str(o.batch_invariant).lower()}, KV cache {kv}{weights})"


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("TEXTGEN_DEVICE=cuda but no CUDA GPU is visible; use auto or cpu.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def context_length(config: object) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def resolve_limits(ctx: int, max_total: int | None, max_input: int | None) -> Limits:
    total = max_total or ctx
    if total > ctx:
        raise ModelLoadError(
            f"max_total_tokens={total} exceeds the model's context length {ctx}; set TEXTGEN_MAX_TOTAL_TOKENS <= {ctx}."
        )
    inp = max_input or total - 1
    if inp >= total:
        raise ModelLoadError(
            f"max_input_tokens={inp} must be below max_total_tokens={total} to leave room to generate."
        )
    return Limits(context_length=ctx, max_total_tokens=total, max_input_tokens=inp)


def _describe(model_id: str) -> str:
    return f"local directory {model_id}" if Path(model_id).exists() else f"hub id '{model_id}'"


def load_tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token_id is None:
        # GPT-2 and Llama ship no pad token; padded positions are masked, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(
    model_id: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_total_tokens: int | None = None,
    max_input_tokens: int | None = None,
    adapter: str | None = None,
    compact_forward: bool = True,
    kv_cache_dtype: str = "auto",
    batch_invariant: bool = True,
    quantize: Quantize = "none",
    compile: bool = False,
) -> LoadedModel:
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    where = _describe(model_id)
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        hint = (
            "check the path"
            if Path(model_id).exists() or "/" not in model_id or model_id.startswith((".", "/"))
            else "check the id, or download it first (the hub may be unreachable: set HF_HUB_OFFLINE=1 "
            "and use a local directory)"
        )
        raise ModelLoadError(f"cannot load model config from {where}: {_first_line(exc)}; {hint}.") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in (
        getattr(config, "auto_map", None) or {}
    ):
        raise ModelLoadError(
            f"{where} is a '{config.model_type}' model, which is not a causal language model; "
            "textgen serves AutoModelForCausalLM models (GPT-2, Llama, ...)."
        )
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype)
    except ValueError as exc:
        raise ModelLoadError(
            f"{where} ({type(config).__name__}) is not a causal language model: {_first_line(exc)}; "
            "textgen serves AutoModelForCausalLM models (GPT-2, Llama, ...)."
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot load weights from {where}: {_first_line(exc)}.") from exc
    loaded_storages = module_storages(model)  # views of the checkpoint's mapping (safetensors)
    try:
        tokenizer = load_tokenizer(model_id)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {where}: {_first_line(exc)}.") from exc
    if adapter:
        model = _apply_adapter(model, adapter)
    # functools.wraps on PreTrainedModel.to makes mypy see an unbound method (self missing).
    model.to(dev).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    try:
        quantize_model(model, quantize)
    except QuantizeUnavailable as exc:
        raise ModelLoadError(str(exc)) from exc
    limits = resolve_limits(context_length(config), max_total_tokens, max_input_tokens)
    compact = compact_model(model) if compact_forward else None
    options = None
    if compact is not None:
        options = ForwardOptions(
            # Invariance is built and tested for CPU kernels only; on GPU one attention call per
            # step (not one per row) is what keeps kernel launches in check.
            batch_invariant=batch_invariant and dev.type == "cpu",
            kv_dtype=torch_dtype if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype),
        )
    elif kv_cache_dtype != "auto":
        raise ModelLoadError(
            f"TEXTGEN_KV_CACHE_DTYPE={kv_cache_dtype} needs the compact forward (GPT-2 or Llama with "
            "TEXTGEN_COMPACT_FORWARD=true); this model runs on the transformers forward."
        )
    # Weights re-laid out above (the compact forward's, quantized ones) left the checkpoint pages they
    # were copied from resident; give those back (app/engine/load/mapped_pages.py).
    released = page_out_stale(loaded_storages, module_storages(model))
    if released:
        log.info("released %d MiB of checkpoint pages no weight reads any more", released >> 20)
    if compile:
        options = _compile(compact, options)
    return LoadedModel(model, tokenizer, model_id, dev, torch_dtype, limits, compact, quantize, options)


def _compile(compact: CompactModel | None, options: ForwardOptions | None) -> ForwardOptions:
    """TEXTGEN_COMPILE: compile and warm up the decode step (app/engine/runner/compiled.py).
    Returns `options` with the compiled step."""
    if compact is None or options is None:
        raise ModelLoadError(
            "TEXTGEN_COMPILE=true needs the compact forward (GPT-2 or Llama with TEXTGEN_COMPACT_FORWARD=true); "
            "this model runs on the transformers forward: unset TEXTGEN_COMPILE."
        )
    from app.engine.runner.compiled import CompiledDecode  # imports torch's compiler stack only when asked

    compiled = CompiledDecode(compact)
    try:
        seconds = compiled.warm_up(compact, options)
    except Exception as exc:  # torch.compile raises many kinds (inductor, a missing C++ compiler, ...)
        raise ModelLoadError(
            f"TEXTGEN_COMPILE: compiling the decode step failed ({type(exc).__name__}: {_first_line(exc)}); "
            "unset TEXTGEN_COMPILE to serve with the eager decode step."
        ) from exc
    log.info("decode step compiled in %.1f s (%s)", seconds, ", ".join(compiled.graphs))
    return replace(options, compiled=compiled)


def _apply_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelLoadError("serving an adapter needs peft: pip install 'textgen-service[train]'.") from exc
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load adapter {adapter}: {_first_line(exc)}.") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
