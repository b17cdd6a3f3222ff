"""Service settings: every field is a `TEXTGEN_*` environment variable and a `textgen serve` flag."""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textgen"


def demo_model_dir() -> Path:
    """Where the offline demo model is built once and reused (outside the repo)."""
    return cache_dir() / "demo-model"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore", protected_namespaces=())

    model: str | None = Field(
        None, description="Hub id or local directory of a causal LM. Unset: the offline demo model."
    )
    adapter: str | None = Field(
        None,
        description="A PEFT (LoRA) adapter directory merged into the model at load (one adapter, any model; "
        "to serve several unmerged, use lora_adapters).",
    )
    lora_adapters: str | None = Field(
        None,
        description="LoRA adapters served unmerged beside the base, chosen per request: name=path,... "
        "(GPT-2/Llama compact forward).",
    )
    max_loras: int = Field(4, ge=0, description="Most LoRA adapters loaded at once (startup and runtime).")
    max_lora_rank: int = Field(64, ge=1, description="Highest LoRA rank an adapter may have (refused above).")
    allow_runtime_lora: bool = Field(
        False, description="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key)."
    )
    lora_root: Path | None = Field(
        None, description="Runtime-loaded adapters must lie under this directory (required for runtime loading)."
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = GPU when present.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16/float16 on GPU, float32 on CPU."
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="KV-cache element type (GPT-2/Llama compact forward). auto = the model's dtype."
    )
    compact_forward: bool = Field(
        True,
        description="Run GPT-2 and Llama models on textgen's own batch-invariant forward; false: "
        "the transformers forward for every model.",
    )
    batch_invariant: bool = Field(
        True,
        description="Compact forward: a request's tokens and logprobs are bitwise the same alone or in any "
        "batch (CPU only; ignored on GPU). false: faster batch-1 GEMMs and one attention call per step.",
    )
    compile: bool = Field(
        False,
        description="Compile the GPT-2/Llama decode step with torch.compile (inductor on CPU, CUDA graphs on "
        "GPU) at startup (~30 s for GPT-2-124M on 2 cores, cached on disk); not faster than eager on CPU; "
        "cannot be combined with LoRA adapters.",
    )
    quantize: Literal["none", "int8-weight-only", "int4-weight-only", "int8-dynamic"] = Field(
        "none",
        description="Quantized linear layers: int8-weight-only (int8 weights per channel, LM head included), "
        "int4-weight-only (int4 in groups of 32, int8 LM head), both on textgen's AVX-512 + VNNI kernels "
        "(activations rounded to 16 bits per group of 32; PyTorch's kernels, with bf16 activations, where "
        "those do not build or the CPU lacks VNNI); int8-dynamic (int8 "
        "weights and per-token int8 activations, through torchao: pip install 'textgen-service[quantize]'). "
        "All batch-invariant. none: the weights as loaded.",
    )
    speculative: Literal["none", "ngram"] = Field(
        "none",
        description="Speculative decoding: ngram = prompt-lookup drafts verified exactly (ids and logprobs "
        "bitwise those of none; compact forward, batch invariant, not compiled). none: off.",
    )
    speculative_tokens: int = Field(4, ge=1, le=64, description="Most draft tokens per sequence and step (k).")
    speculative_ngram_min: int = Field(
        1, ge=1, description="Shortest n-gram of the newest tokens that must recur in the context for a draft."
    )
    speculative_ngram_max: int = Field(
        4, ge=1, description="Longest n-gram looked up first (the longest that recurs gives the draft)."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        # torch accepts any count, then segfaults in the first GEMM (100000, 2026-11-30); 1024 passes
        # every CPU sold and stays far below where thread creation fails.
        le=1024,
        description="Threads for torch's compute (torch.set_num_threads), at most 1024; more than the cores "
        "only slows it down. Unset: torch's default, one per core.",
    )
    max_input_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens. Default: max_total_tokens - 1."
    )
    max_total_tokens: int | None = Field(
        None, ge=2, description="Prompt + generated tokens per request. Default: the model's context length."
    )
    max_new_tokens_default: int = Field(
        100, ge=1, description="max_new_tokens when a request does not set it (clipped to the context)."
    )
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one step.")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="KV-cache budget in cached token positions, counting everything allocated (spare "
        "capacity, prefills in flight, copies). Default: enough for max_batch_size full-length requests.",
    )
    prefix_cache: bool = Field(
        True,
        description="Automatic prefix caching (compact forward): keep the K/V of recent prompts in 16-token "
        "blocks and prefill only the part of a new prompt not cached. false: every prompt is prefilled whole.",
    )
    prefix_cache_max_tokens: int = Field(
        2048,
        ge=16,  # one block (app.engine.runner.compact_batch.ATTENTION_CHUNK)
        description="Most token positions the prefix cache keeps (within what TEXTGEN_MAX_BATCH_TOKENS leaves "
        "free of live requests, which always win).",
    )
    max_prefill_tokens: int = Field(
        2048, ge=1, description="Prompt tokens prefilled in one step (bounds decode stalls)."
    )
    max_queue: int = Field(
        128, ge=0, description="Waiting requests; beyond this new ones get 429 (0: none wait, idle slots still admit)."
    )
    max_embed_batch: int = Field(64, ge=1, description="Most inputs in one /embed request (413 beyond).")
    grammar_compile_timeout: float = Field(
        10.0, gt=0, description="Seconds a structured-output grammar may take to compile (400/422 beyond)."
    )
    json_additional_properties: bool = Field(
        False,
        description="What a JSON-schema object that lists `properties` without `additionalProperties` allows: "
        "false = no other keys (vLLM's default backend, OpenAI strict mode); true = any (JSON Schema's default).",
    )
    max_tool_calls: int = Field(
        8,
        ge=1,
        description="Most calls in one answer under tool_choice 'required' (Anthropic 'any') with parallel calls: "
        "the grammar closes the list there, so a model that repeats a call still ends with complete calls.",
    )
    max_stop_sequences: int = Field(8, ge=0, description="Most stop strings per request.")
    max_best_of: int = Field(8, ge=1, description="Largest n (choices) per OpenAI request.")
    decisions_max_questions: int = Field(
        64, ge=1, description="Most questions in one /v1/decisions request (400 naming `questions` beyond)."
    )
    decisions_max_options: int = Field(
        64, ge=2, description="Most choices or levels per /v1/decisions question (400 naming the field beyond)."
    )
    max_body_bytes: int = Field(2_000_000, ge=1024, description="Largest request body (413 beyond).")
    request_timeout: float | None = Field(
        None, gt=0, description="Seconds before a request is cancelled with 504 (unset: no limit)."
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="Seconds to finish in-flight requests on SIGTERM before exiting."
    )
    drain_delay: float = Field(
        5.0,
        ge=0,
        description="Lame-duck seconds after SIGTERM: /ready answers 503 at once but new requests are still "
        "admitted this long, so load balancers stop routing here before admission stops. 0: stop at once.",
    )
    api_key: str | None = Field(None, description="Bearer key(s), comma-separated. Unset: no auth.")
    api_key_file: Path | None = Field(None, description="File with one API key per line.")
    metrics_require_key: bool = Field(False, description="Require the API key for /metrics too.")
    cors_origins: str = Field("", description="Comma-separated allowed CORS origins (none by default).")
    log_prompts: bool = Field(False, description="Include prompts and outputs in access logs.")
    embedding_model: str | None = Field(
        None, description="Sentence-transformers style model for /embed and /v1/embeddings."
    )
    chat_template: Path | None = Field(None, description="Jinja chat template file for /v1/chat/completions.")
    otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry traces: an OTLP collector URL (http/protobuf, or gRPC with "
        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc), or file:///path.jsonl for OTLP JSON lines. Unset: tracing off "
        "unless OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set.",
    )
    ui: bool = Field(True, description="Serve the browser playground at / and /ui/ (false: off).")
    served_model_name: str | None = Field(
        None, description="Model name clients send to /v1 routes. Default: the --model value as given, or textgen-demo."
    )

    @model_validator(mode="after")
    def _ngram_bounds(self) -> "Settings":
        if self.speculative_ngram_min > self.speculative_ngram_max:
            raise ValueError(
                f"TEXTGEN_SPECULATIVE_NGRAM_MIN ({self.speculative_ngram_min}) is above "
                f"TEXTGEN_SPECULATIVE_NGRAM_MAX ({self.speculative_ngram_max})"
            )
        return self

    def resolved_model(self) -> str:
        return self.model or str(demo_model_dir())

    def api_keys(self) -> list[str]:
        """Keys from TEXTGEN_API_KEY (comma-separated) and TEXTGEN_API_KEY_FILE (one per line)."""
        keys = [k.strip() for k in (self.api_key or "").split(",")]
        if self.api_key_file is not None:
            keys += [line.strip() for line in self.api_key_file.read_text(encoding="utf-8").splitlines()]
        return [k for k in keys if k and not k.startswith("#")]

    def lora_adapter_map(self) -> dict[str, str]:
        """TEXTGEN_LORA_ADAPTERS parsed: {name: path}. Raises ValueError on a malformed entry."""
        out: dict[str, str] = {}
        for entry in (self.lora_adapters or "").split(","):
            if not entry.strip():
                continue
            name, sep, path = entry.strip().partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"TEXTGEN_LORA_ADAPTERS entry {entry!r} is not name=path")
            if name.strip() in out:
                raise ValueError(f"TEXTGEN_LORA_ADAPTERS names {name.strip()!r} twice")
            out[name.strip()] = path.strip()
        return out

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
