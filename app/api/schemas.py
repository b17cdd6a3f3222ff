"""Request and response bodies of the TGI/TEI-compatible routes.

Unknown fields are ignored, as TGI does: clients such as huggingface_hub send every parameter
they know about, many as null.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.core.types import SamplingParams, StoppingParams

NonEmpty = Annotated[str, Field(min_length=1)]


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are ignored (as TGI does), NaN and Infinity
    are rejected (they would poison sampling)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        # JSON can carry unpaired surrogates ("\\ud800") that no tokenizer or UTF-8 response takes.
        _check_unicode(value)
        return value


@dataclass(frozen=True)
class Refused:
    """Marks a known field textgen does not implement (`Annotated[Any, Refused(...)] = None`):
    null, or a value `accepts` takes (the field's default), passes; anything else is refused
    with an error naming the field (docs/api.md, "Refused fields")."""

    accepts: Callable[[Any], bool] = lambda value: False


def refused_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """Names of the refused fields that `body` (and the request models it nests, such as
    `stream_options`) sets to something other than null or default."""
    out = []
    for name, info in type(body).model_fields.items():
        value = getattr(body, name)
        for mark in info.metadata:
            if isinstance(mark, Refused) and value is not None and not mark.accepts(value):
                out.append(prefix + name)
        if isinstance(value, RequestModel):
            out += refused_fields(value, f"{prefix}{name}.")
    return out


def _check_unicode(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text contains an unpaired surrogate code point; send valid Unicode") from None
    elif isinstance(value, list | tuple):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


class GenerateParameters(RequestModel):
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate (default 100, clipped).")
    min_new_tokens: int | None = Field(
        None, ge=0, description="Suppress EOS until this many tokens (extension, like vLLM's min_tokens)."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature; setting it enables sampling.")
    top_k: int | None = Field(None, gt=0, description="Keep the k most likely tokens; enables sampling.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass in (0, 1]; enables sampling.")
    typical_p: float | None = Field(None, gt=0, le=1, description="Typical sampling mass in (0, 1].")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages repeating tokens.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI-style frequency penalty.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random seed for sampling.")
    stop: list[NonEmpty] = Field(default_factory=list, description="Stop strings (not included in the output).")
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")
    details: bool = Field(False, description="Return finish reason, token count, seed and tokens.")
    decoder_input_details: bool = Field(False, description="With details: also return the prompt tokens.")
    top_n_tokens: int | None = Field(None, ge=0, le=20, description="With details: most likely tokens per step.")
    truncate: int | None = Field(None, ge=1, description="Keep only the last `truncate` prompt tokens.")
    watermark: bool = Field(False, description="Not supported; must be false.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    grammar: Any = Field(None, description='Structured output: {"type": "json" | "regex", "value": ...}.')
    adapter_id: str | None = Field(
        None, description="A loaded LoRA adapter's name (docs/api.md, Serving many adapters); null: the base model."
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"max_new_tokens": 20, "do_sample": True, "temperature": 0.8, "seed": 1}]},
    )

    def to_sampling_params(self) -> SamplingParams:
        """The engine's settings. As in TGI, asking for any warper turns sampling on. Every field
        of SamplingParams TGI's API has is mapped (tests/unit/api/test_to_sampling_params.py)."""
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )
        return SamplingParams(
            do_sample=self.do_sample or warped,
            temperature=self.temperature or 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            top_logprobs=self.top_n_tokens or 0,
        )

    def to_stopping_params(self, max_new_tokens: int, stop: tuple[str, ...]) -> StoppingParams:
        """The engine's stop conditions, `max_new_tokens` and `stop` as the route resolved and
        checked them. As TGI does, the matched stop sequence stays in generated_text (and in the
        stream)."""
        return StoppingParams(max_new_tokens, self.min_new_tokens or 0, stop, include_stop=True)


class GenerateRequest(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"inputs": "The list", "parameters": {"max_new_tokens": 20}}]},
    )

    inputs: NonEmpty = Field(description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatRequest(GenerateRequest):
    stream: bool = Field(False, description="Answer as /generate_stream (SSE) when true.")


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


FinishReasonOut = Literal["length", "eos_token", "stop_sequence"]


class Details(BaseModel):
    finish_reason: FinishReasonOut
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)
    top_tokens: list[list[TokenOut]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReasonOut
    generated_tokens: int
    seed: int | None


class StreamEvent(BaseModel):
    index: int
    token: TokenOut
    top_tokens: list[TokenOut] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class EmbedRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": ["What is a list?", "Lists are sequences."]}]})

    inputs: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]
    normalize: bool = True
    truncate: bool = False


class ErrorBody(BaseModel):
    error: str
    error_type: str
