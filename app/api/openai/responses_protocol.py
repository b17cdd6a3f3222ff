"""OpenAI Responses request body and the response objects' shapes (`openai/types/responses/`).

The request is checked here only for what pydantic can say; `app/api/openai/responses.py` turns
it into the internal `ChatRequest` and says what is wrong with its items. Fields that ask for
nothing this stateless, text-only server holds are accepted; fields that ask for something it
does not do are refused with a 400 naming them (docs/api.md, "OpenAI Responses").
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from app.api.schemas import Refused, RequestModel


class TextConfig(RequestModel):
    format: dict[str, Any] | None = Field(
        None, description="{'type': 'text'} (default), {'type': 'json_object'} or {'type': 'json_schema', 'schema'}."
    )
    # OpenAI's default; asking for terser or longer answers is not something a sampler can do.
    verbosity: Annotated[Any, Refused(lambda v: v == "medium")] = None


class StreamOptions(RequestModel):
    # Obfuscation pads deltas against length side channels; this server sends no padding.
    include_obfuscation: bool | None = None


class ResponsesRequest(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "textgen-demo", "input": "Hi", "max_output_tokens": 20}]},
    )

    model: str = Field(description="The id from GET /v1/models.")
    input: str | list[dict[str, Any]] = Field(
        description="A user message, or items: messages, function_call, function_call_output."
    )
    instructions: str | None = Field(None, description="A system message put before `input`.")
    tools: list[dict[str, Any]] | None = Field(None, description="Function tools: {type, name, parameters}.")
    tool_choice: Any = Field(None, description="'none', 'auto' (default with tools), 'required' or {type, name}.")
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate; omitted: up to the context's end."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1; 0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Candidates per token in `logprobs`.")
    text: TextConfig | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted because they ask for nothing this server holds:
    include: list[str] | None = Field(
        None, description="'message.output_text.logprobs', and 'reasoning.encrypted_content' (adds nothing)."
    )
    reasoning: dict[str, Any] | None = Field(None, description="Accepted; no reasoning items are returned.")
    prompt_cache_key: str | None = Field(None, description="Accepted; the prefix cache needs no key.")
    metadata: dict[str, str] | None = Field(None, description="Echoed in the response.")
    user: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    service_tier: Annotated[Any, Refused(lambda v: v in ("auto", "default"))] = None
    # Stateless: nothing is stored, so nothing can be referred to later.
    store: Annotated[Any, Refused(lambda v: v is False)] = None
    previous_response_id: Annotated[Any, Refused()] = None
    conversation: Annotated[Any, Refused()] = None
    background: Annotated[Any, Refused(lambda v: v is False)] = None
    # Not implemented:
    truncation: Annotated[Any, Refused(lambda v: v == "disabled")] = None
    prompt: Annotated[Any, Refused()] = None
    max_tool_calls: Annotated[Any, Refused()] = None
    prompt_cache_retention: Annotated[Any, Refused(lambda v: v == "in_memory")] = None
    prompt_cache_options: Annotated[Any, Refused()] = None
    context_management: Annotated[Any, Refused()] = None


def item_id(prefix: str) -> str:
    """OpenAI-style ids: `resp_…`, `msg_…`, `fc_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def now() -> float:
    return float(int(time.time()))


def usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    """Responses' usage names. No reasoning tokens (the model's text is all output) and no explicit
    cache writes (the prefix cache fills itself)."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


Status = Literal["in_progress", "completed", "incomplete"]


def output_text(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(text: str, status: Status, message_id: str | None = None, logprobs: list[dict] | None = None) -> dict:
    """An assistant `message` output item with one `output_text` part ([] while in progress)."""
    return {
        "type": "message",
        "id": message_id or item_id("msg"),
        "role": "assistant",
        "status": status,
        "content": [output_text(text, logprobs)] if status != "in_progress" else [],
    }


def function_call_item(call_id: str, name: str, arguments: str, status: Status = "completed") -> dict:
    return {
        "type": "function_call",
        "id": item_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }
