"""Ollama's fields to textgen's internal requests (OpenAI's ChatRequest / CompletionRequest), and
engine results back to Ollama's shapes (tool output: app/api/ollama/tool_output.py). Each documented field is served or refused here with a 400
naming it (docs/api.md, "Ollama")."""

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from app.api.errors import APIError, validation
from app.api.ollama.protocol import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, Message, Options
from app.engine.core.types import Completion
from app.engine.load.loader import Limits
from app.service import Service

DONE_REASON = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}

# Options that set up Ollama's runner process: textgen sets these once, at start.
RUNNER_OPTIONS = {
    "numa": "NUMA placement",
    "num_batch": "TEXTGEN_MAX_PREFILL_TOKENS / TEXTGEN_MAX_BATCH_TOKENS",
    "num_gpu": "TEXTGEN_DEVICE",
    "main_gpu": "TEXTGEN_DEVICE",
    "low_vram": "TEXTGEN_MAX_BATCH_TOKENS",
    "f16_kv": "TEXTGEN_KV_CACHE_DTYPE",
    "logits_all": "logprobs",
    "vocab_only": "model loading",
    "use_mmap": "model loading",
    "use_mlock": "model loading",
    "embedding_only": "model loading",
    "num_thread": "TEXTGEN_TORCH_THREADS",
    "num_gqa": "the model's config",
    "rope_frequency_base": "the model's config",
    "rope_frequency_scale": "the model's config",
}
# Options textgen serves only at the value that turns them off (it has no such sampler).
OFF_VALUES: dict[str, Any] = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "penalize_newline": False}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def not_found(name: str) -> APIError:
    return APIError(404, f"model '{name}' not found", "model_not_found", "model")


def resolve_model(service: Service, name: str, *, embedding: bool = False) -> str:
    """The served name `name` asks for: the base model, a loaded LoRA adapter or (for embeddings)
    TEXTGEN_EMBEDDING_MODEL; Ollama's default tag `:latest` may be appended. 404 otherwise."""
    served = {service.model_name}
    if embedding and service.settings.embedding_model:
        served.add(service.settings.embedding_model)
    if not embedding and service.engine is not None:
        served.update(service.engine.adapters.names())
    for candidate in (name, name.removesuffix(":latest")):
        if candidate in served:
            return candidate
    raise not_found(name)


def keep_alive_seconds(value: float | str | None, field: str = "keep_alive") -> float | None:
    """Ollama's keep_alive (seconds, or a Go duration such as "5m" or "-1"). textgen keeps its model
    loaded for the server's lifetime, which honours every value but 0, "unload now": refused."""
    if value is None:
        return None
    seconds: float | None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # a bare number is seconds
        except ValueError:
            parts = _DURATION.findall(body)
            whole = "".join(n + u for n, u in parts)
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts) if parts and whole == body else None
    if seconds is None:
        raise validation(f"`{field}` must be seconds or a duration such as '5m' or '-1'; got {value!r}", field)
    if seconds == 0:
        raise validation(
            f"`{field}` 0 would unload the model; textgen keeps its model loaded for the server's lifetime", field
        )
    return seconds


def check_options(opts: Options) -> None:
    """Refuse unknown options, runner settings, and samplers textgen lacks (unless off)."""
    for key in opts.model_extra or {}:
        raise validation(f"`options.{key}` is not an Ollama option this server knows", f"options.{key}")
    for key, setting in RUNNER_OPTIONS.items():
        if getattr(opts, key) is not None:
            raise validation(
                f"`options.{key}` configures Ollama's runner; textgen sets it once at start ({setting}): omit it",
                f"options.{key}",
            )
    for key, off in OFF_VALUES.items():
        value = getattr(opts, key)
        if value is not None and value != off:
            raise validation(
                f"`options.{key}` is not supported by this server; omit it or send {off}", f"options.{key}"
            )
    if opts.mirostat_tau is not None or opts.mirostat_eta is not None:
        key = "mirostat_tau" if opts.mirostat_tau is not None else "mirostat_eta"
        raise validation(f"`options.{key}` needs mirostat, which this server does not implement", f"options.{key}")
    if opts.num_keep is not None:
        raise validation(
            "`options.num_keep` is not supported: textgen never shifts the context (a prompt over the limit is a 400)",
            "options.num_keep",
        )
    if opts.repeat_last_n not in (None, -1, 0):
        raise validation(
            "`options.repeat_last_n` must be -1 (penalties see the whole context, as textgen applies them) "
            "or 0 (penalties off)",
            "options.repeat_last_n",
        )
    if opts.num_predict == 0:
        raise validation(
            "`options.num_predict` must be >= 1, or -1/-2 (until the context is full)", "options.num_predict"
        )


def sampling_fields(opts: Options | None) -> dict[str, Any]:
    """Keyword fields of the internal request (OpenAI's names) for Ollama's options, with Ollama's
    defaults for temperature, top_k and top_p."""
    opts = opts or Options()
    check_options(opts)
    penalties_off = opts.repeat_last_n == 0
    stop = [opts.stop] if isinstance(opts.stop, str) else list(opts.stop or [])
    fields: dict[str, Any] = {
        "temperature": DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature,
        "top_p": DEFAULT_TOP_P if opts.top_p is None else opts.top_p,
        "top_k": DEFAULT_TOP_K if opts.top_k is None else (opts.top_k if opts.top_k > 0 else -1),
        "min_p": opts.min_p or None,
        "seed": opts.seed if opts.seed is not None and opts.seed >= 0 else None,
        "stop": stop or None,
    }
    if not penalties_off:
        fields.update(
            repetition_penalty=opts.repeat_penalty,
            presence_penalty=opts.presence_penalty or 0.0,
            frequency_penalty=opts.frequency_penalty or 0.0,
        )
    return fields


def max_new_tokens(service: Service, limits: Limits, opts: Options | None, prompt_len: int, prompt_field: str) -> int:
    """Tokens to generate. `num_ctx` caps prompt + output (at most the server's limit, as Ollama
    caps it at the model's trained context); `num_predict` is clipped to the room left, as Ollama
    stops at the context's end; omitted: TEXTGEN_MAX_NEW_TOKENS_DEFAULT, as on the other routes."""
    opts = opts or Options()
    window = limits.max_total_tokens if opts.num_ctx is None else min(opts.num_ctx, limits.max_total_tokens)
    if prompt_len == 0:
        raise validation(f"`{prompt_field}` must not be empty (it tokenized to zero tokens)", prompt_field)
    limit = min(window - 1, limits.max_input_tokens)
    if prompt_len > limit:
        field = "options.num_ctx" if opts.num_ctx is not None and window - 1 < limits.max_input_tokens else prompt_field
        raise validation(
            f"`{prompt_field}` has {prompt_len} tokens; at most {limit} fit (TEXTGEN_MAX_INPUT_TOKENS"
            f"{', options.num_ctx' if field == 'options.num_ctx' else ''}): send a shorter prompt",
            field,
        )
    room = window - prompt_len
    if opts.num_predict is None:
        return min(service.settings.max_new_tokens_default, room)
    if opts.num_predict < 0:
        return room
    return min(opts.num_predict, room)


def format_spec(value: str | dict | None) -> dict | None:
    """Ollama's `format` as OpenAI's `response_format` (one structured-output path)."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise validation(f"`format` must be 'json' or a JSON schema (an object); got {value!r}", "format")


def check_think(think: bool | str | None) -> None:
    if think not in (None, False):
        raise validation(
            "`think` is not supported: this server runs no thinking models; omit it or send false", "think"
        )


def check_logprobs(logprobs: bool, top: int | None) -> int:
    if top and not logprobs:
        raise validation("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    return (top or 0) if logprobs else 0


def chat_messages(messages: list[Message]) -> list[dict]:
    """Ollama's messages as the internal chat messages: tool calls get OpenAI's `type` (their
    `arguments` stay objects, as chat templates expect), a tool result's `tool_name` is also its
    `name`. Images are refused."""
    out = []
    for i, m in enumerate(messages):
        if m.images:
            raise validation(
                f"`messages[{i}].images`: this server runs text-only models; send no images", f"messages.{i}.images"
            )
        message = m.model_dump(exclude_none=True, exclude={"images"})
        if m.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": call.model_dump(exclude_none=True)["function"]}
                for call in m.tool_calls
            ]
        if m.tool_name and "name" not in message:
            message["name"] = m.tool_name
        message.setdefault("content", "")
        out.append(message)
    return out


def created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def stats(started: float, completion: Completion | None) -> dict[str, Any]:
    """The final object's counts and durations (nanoseconds): total from the request's arrival;
    prompt evaluation from admission to the first token (the prefill); evaluation from the first
    token to the last. The model is loaded at start, so nothing loads per request."""
    out: dict[str, Any] = {
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
    }
    if completion is None:
        return out
    t = completion.timeline
    prefill = t.first_token - t.admitted if t is not None and t.first_token else 0.0
    decode = t.finished - t.first_token if t is not None and t.first_token else 0.0
    out.update(
        prompt_eval_count=completion.prompt_tokens,
        prompt_eval_duration=int(max(prefill, 0.0) * 1e9),
        eval_count=completion.generated_tokens,
        eval_duration=int(max(decode, 0.0) * 1e9),
    )
    return out


def as_ndjson(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"
