"""OpenAI request and response bodies (the subset textgen serves, plus vLLM-style extensions).

Unknown fields are ignored, as on every textgen route, so newer SDKs keep working. Known fields
that textgen does not implement are declared with `refused(...)`: null (or their default) is
accepted, anything else is a 400 naming the field (docs/api.md, "Refused fields").
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.errors import validation
from app.api.schemas import Refused, RequestModel
from app.engine.core.types import SamplingParams, StoppingParams

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="Extension (vLLM): with include_usage, `usage` in every chunk too (tokens so far)."
    )


class SamplingFields(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="The id from GET /v1/models.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="Choices per prompt; with a seed, choice i uses seed + i.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = Field(None, description="Accepted and ignored.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit before sampling."
    )
    # Extensions, as in vLLM:
    top_k: int | None = Field(None, ge=-1, description="Extension: keep the k most likely tokens (-1: off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Extension: drop tokens below min_p x the top one.")
    min_tokens: int = Field(0, ge=0, description="Extension: suppress EOS until this many tokens.")
    repetition_penalty: float | None = Field(None, gt=0, description="Extension: HF-style repetition penalty.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Extension: token ids that end generation like EOS."
    )
    ignore_eos: bool = Field(False, description="Extension: keep generating past EOS.")
    include_stop_str_in_output: bool = Field(False, description="Extension: keep the matched stop string.")
    # Structured output (app/api/structured.py checks them and says what is wrong).
    response_format: Any = Field(None, description="{'type': 'text' | 'json_object' | 'json_schema', ...}.")
    structured_outputs: Any = Field(
        None, description="Extension (vLLM): one of json (schema), regex, choice (list), grammar (Lark)."
    )
    guided_json: Any = Field(None, description="Extension (older vLLM): a JSON schema.")
    guided_regex: Any = Field(None, description="Extension (older vLLM): a regex.")
    guided_choice: Any = Field(None, description="Extension (older vLLM): a list of strings.")
    guided_grammar: Any = Field(None, description="Extension (older vLLM): a Lark grammar.")
    # Known but not implemented: refused unless null or default.
    use_beam_search: Annotated[Any, Refused(lambda v: v is False)] = None
    skip_special_tokens: Annotated[Any, Refused(lambda v: v is True)] = None
    prompt_logprobs: Annotated[Any, Refused()] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def asked_top_logprobs(self) -> int:
        """Candidates per token the body asks for; the request types that return logprobs say how."""
        return 0

    def to_sampling_params(self, vocab: int, choice: int = 0, top_logprobs: int | None = None) -> SamplingParams:
        """The engine's settings for choice `choice` of this request (with a seed, choice i uses
        seed + i, as vLLM). `top_logprobs` overrides `asked_top_logprobs()` (for callers whose
        own body says it). Raises APIError (400) naming `logit_bias` for a token outside the
        `vocab` ids or a bias outside [-100, 100]. Every field of SamplingParams a client can set
        here is mapped (tests/unit/api/test_to_sampling_params.py walks them)."""
        greedy = self.temperature == 0
        return SamplingParams(
            do_sample=not greedy,
            temperature=1.0 if greedy else self.temperature,
            top_k=self.top_k if self.top_k not in (None, -1, 0) else None,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + choice,
            top_logprobs=self.asked_top_logprobs() if top_logprobs is None else top_logprobs,
            min_p=self.min_p,
            logit_bias=self._logit_bias(vocab),
        )

    def _logit_bias(self, vocab: int) -> tuple[tuple[int, float], ...]:
        """OpenAI's `logit_bias` ({"token id": bias}) checked against the vocabulary."""
        out = []
        for key, value in (self.logit_bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise validation(f"`logit_bias` keys must be token ids; got {key!r}", "logit_bias") from None
            if not 0 <= token_id < vocab:
                raise validation(f"`logit_bias` token id {token_id} is outside the vocabulary ({vocab})", "logit_bias")
            if not -100 <= value <= 100:
                raise validation(f"`logit_bias` values must be in [-100, 100]; got {value}", "logit_bias")
            out.append((token_id, float(value)))
        return tuple(out)

    def to_stopping_params(self, max_new_tokens: int, stop: tuple[str, ...]) -> StoppingParams:
        """The engine's stop conditions: `max_new_tokens` and `stop` as the route resolved and
        checked them (they need the model's limits and tokenizer); the rest from the body."""
        return StoppingParams(
            max_new_tokens,
            self.min_tokens,
            stop,
            include_stop=self.include_stop_str_in_output,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "textgen-demo", "prompt": "The list", "max_tokens": 20}]},
    )

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate; omitted or null: 16 (OpenAI's default)."
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top log-probabilities per token.")
    echo: bool = Field(False, description="Prepend the prompt to the text (and its tokens to logprobs).")
    best_of: int | None = Field(None, ge=1, description="Generate this many and return the `n` most likely.")
    suffix: Annotated[Any, Refused(lambda v: v == "")] = None

    def asked_top_logprobs(self) -> int:
        return self.logprobs or 0


class ChatMessage(RequestModel):
    """Every field (name, tool_calls, tool_call_id, ...) reaches the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "textgen-demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}]
        },
    )

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = Field(None, description="Functions the model may call (docs/api.md, Tool calling).")
    tool_choice: Any = Field(None, description="'none', 'auto' (default with tools), 'required' or a named function.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extension: extra template variables.")
    add_generation_prompt: bool = Field(True, description="Extension: end the prompt with the assistant header.")
    continue_final_message: bool = Field(False, description="Extension: continue the last message instead.")
    parallel_tool_calls: bool | None = Field(None, description="With 'required': one call (false) or a list (true).")
    functions: Annotated[Any, Refused()] = None
    function_call: Annotated[Any, Refused(lambda v: v == "none")] = None
    audio: Annotated[Any, Refused()] = None
    modalities: Annotated[Any, Refused(lambda v: v == ["text"])] = None
    prediction: Annotated[Any, Refused()] = None
    reasoning_effort: Annotated[Any, Refused()] = None
    web_search_options: Annotated[Any, Refused()] = None
    store: Annotated[Any, Refused(lambda v: v is False)] = None
    echo: Annotated[Any, Refused(lambda v: v is False)] = None
    chat_template: Annotated[Any, Refused()] = None

    def asked_top_logprobs(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


class EmbeddingRequest(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "textgen-demo", "input": ["a list", "a tuple"]}]},
    )

    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Only the model's own dimension is supported.")
    user: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int = 0) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)


class CompletionUsage(Usage):
    """Usage of completions and chat: OpenAI's, with `prompt_tokens_details.cached_tokens`."""

    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int = 0, cached_tokens: int = 0) -> "CompletionUsage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textgen"
    root: str | None = Field(None, description="A LoRA adapter's path; the base model's id otherwise (vLLM).")
    parent: str | None = Field(None, description="A LoRA adapter's base model id; null for the base (vLLM).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
