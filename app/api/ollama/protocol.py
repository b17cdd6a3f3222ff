"""Ollama request bodies (docs/api.md of ollama/ollama and the `ollama` Python client 0.6.3).

Every field Ollama documents is declared here: app/api/ollama/convert.py serves it or refuses it
with a 400 naming it (docs/api.md, "Ollama"). Unknown top-level fields are ignored, as on every textgen
route; unknown `options` keys are refused, since Ollama defines that set.
"""

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from app.api.schemas import RequestModel

# Ollama's documented defaults (api/types.go DefaultOptions), used when an option is omitted.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9


class Options(RequestModel):
    """Ollama's `options` (Modelfile parameters). Ranges are the ones textgen's sampler takes."""

    model_config = ConfigDict(extra="allow")  # unknown keys are refused by name (convert.py)

    # Sampling, served:
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy. Default 0.8.")
    top_k: int | None = Field(None, description="Keep the k most likely tokens; <= 0: off. Default 40.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass. Default 0.9.")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, le=2**63 - 1, description="Negative: a random seed (Ollama's -1).")
    num_predict: int | None = Field(None, ge=-2, description="Tokens to generate; -1/-2: until the context is full.")
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_last_n: int | None = Field(None, ge=-1, description="Only -1 (the whole context) or 0 (penalties off).")
    num_ctx: int | None = Field(None, ge=1, description="Context window: prompt + output, capped at the server's.")
    # Served only at their off value (textgen has no such sampler): typical_p 1, tfs_z 1, mirostat 0,
    # penalize_newline false.
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    num_keep: int | None = None
    # Settings of Ollama's runner process, refused: textgen sets them once, at start.
    numa: Any = None
    num_batch: Any = None
    num_gpu: Any = None
    main_gpu: Any = None
    low_vram: Any = None
    f16_kv: Any = None
    logits_all: Any = None
    vocab_only: Any = None
    use_mmap: Any = None
    use_mlock: Any = None
    embedding_only: Any = None
    num_thread: Any = None
    num_gqa: Any = None
    rope_frequency_base: Any = None
    rope_frequency_scale: Any = None


class ToolFunction(RequestModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(RequestModel):
    model_config = ConfigDict(extra="allow")

    function: ToolFunction


class Message(RequestModel):
    """A chat message; every field (thinking, tool_name, ...) reaches the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None
    images: list[Any] | None = Field(None, description="Refused when non-empty: textgen serves text-only models.")
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class _GenerateFields(RequestModel):
    model: Annotated[str, Field(min_length=1)]
    stream: bool | None = Field(None, description="NDJSON stream unless false (Ollama's default is true).")
    options: Options | None = None
    format: str | dict[str, Any] | None = Field(None, description="'json' or a JSON schema.")
    keep_alive: float | str | None = Field(None, description="The model stays loaded; 0 (unload) is refused.")
    think: bool | str | None = Field(None, description="Refused unless false: no thinking models here.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class GenerateRequest(_GenerateFields):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "textgen-demo", "prompt": "The list", "stream": False}]},
    )

    prompt: str | None = None
    suffix: str | None = Field(None, description="Fill-in-the-middle: refused unless empty.")
    system: str | None = None
    template: str | None = Field(None, description="Refused: the model's Jinja chat template is used.")
    context: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="Token ids from an earlier answer.")
    raw: bool = False
    images: list[Any] | None = None
    width: Any = None
    height: Any = None
    steps: Any = None


class ChatRequest(_GenerateFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "textgen-demo", "messages": [{"role": "user", "content": "Hi"}], "stream": False}]
        },
    )

    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class EmbedRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "textgen-demo", "input": ["a", "b"]}]})

    model: Annotated[str, Field(min_length=1)]
    input: str | list[str]
    truncate: bool = Field(True, description="Cut inputs to the model's limit (Ollama's default); false: 400.")
    options: Options | None = None
    keep_alive: float | str | None = None
    dimensions: int | None = Field(None, ge=1, description="Only the model's own dimension.")


class EmbeddingsRequest(RequestModel):
    """The older /api/embeddings."""

    model: Annotated[str, Field(min_length=1)]
    prompt: str
    options: Options | None = None
    keep_alive: float | str | None = None


class ShowRequest(RequestModel):
    model: str | None = None
    name: str | None = Field(None, description="Older clients' spelling of `model`.")
    verbose: bool = False
