"""Anthropic Messages request bodies (what the `anthropic` SDK 2.17 sends, plus `temperature`,
`top_p` and `top_k`, which older SDKs send) and response shapes.

Unknown top-level fields are a 400 ("<field>: Extra inputs are not permitted"), as Anthropic
answers them; every body field the SDK's `messages.create` / `count_tokens` (and their `beta`
forms) can send is declared. Known fields asking for what textgen does not do (extended thinking,
server-side containers and MCP servers, ...) are `Refused`: null or their neutral value passes,
anything else is a 400 naming the field.
"""

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import Refused, RequestModel


class InputMessage(RequestModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class OutputConfig(RequestModel):
    format: dict[str, Any] | None = Field(
        None, description="{'type': 'json_schema', 'schema': {...}}: the answer is JSON valid against the schema."
    )
    effort: Annotated[Any, Refused()] = None  # a reasoning budget: these models do not reason


class AnthropicRequest(RequestModel):
    """A top-level Anthropic body: an unknown field is a 400 naming it, as in Anthropic's API
    (other textgen routes ignore unknown fields, as TGI does)."""

    model_config = ConfigDict(extra="forbid")

    # The SDK's beta-only fields; they ask for what textgen does not do (billing, server-held
    # threads and compaction, fallback models), so they are refused unless null.
    billing_policy: Annotated[Any, Refused()] = None
    compaction: Annotated[Any, Refused()] = None
    fallbacks: Annotated[Any, Refused()] = None
    fallback_credit_token: Annotated[Any, Refused()] = None
    thread: Annotated[Any, Refused()] = None


class MessagesRequest(AnthropicRequest):
    """POST /v1/messages. `max_tokens` is required, as in Anthropic's API."""

    model: str = Field(description="The id from GET /v1/models.")
    max_tokens: int = Field(ge=1, description="Tokens to generate at most.")
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = Field(None, description="A string or a list of text blocks.")
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    metadata: dict[str, Any] | None = Field(None, description="{'user_id': ...}: accepted, not used.")
    tools: list[dict[str, Any]] | None = Field(None, description="Client tools: {name, description, input_schema}.")
    tool_choice: dict[str, Any] | None = Field(None, description="{'type': 'auto' | 'any' | 'tool' | 'none'}.")
    output_config: OutputConfig | None = None
    # Accepted: they ask for nothing that changes the output here.
    cache_control: dict[str, Any] | None = Field(None, description="Accepted: the prefix cache is automatic.")
    service_tier: Literal["auto", "standard_only"] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # Known, not done: refused unless null (or their neutral value).
    thinking: Annotated[Any, Refused(lambda v: isinstance(v, dict) and v.get("type") == "disabled")] = None
    speed: Annotated[Any, Refused(lambda v: v == "standard")] = None
    inference_geo: Annotated[Any, Refused()] = None
    container: Annotated[Any, Refused()] = None
    mcp_servers: Annotated[Any, Refused(lambda v: v == [])] = None
    context_management: Annotated[Any, Refused()] = None
    diagnostics: Annotated[Any, Refused()] = None


class CountTokensRequest(AnthropicRequest):
    """POST /v1/messages/count_tokens: the prompt-side fields of a Messages request."""

    model: str
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    thinking: Annotated[Any, Refused(lambda v: isinstance(v, dict) and v.get("type") == "disabled")] = None
    speed: Annotated[Any, Refused(lambda v: v == "standard")] = None
    mcp_servers: Annotated[Any, Refused(lambda v: v == [])] = None
    context_management: Annotated[Any, Refused()] = None


class Usage(BaseModel):
    """`input_tokens` are the prompt tokens prefilled; `cache_read_input_tokens` those served
    from the prefix cache (their sum is the prompt). The cache is written automatically, at no
    cost, so `cache_creation_input_tokens` is always 0."""

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


class AnthropicError(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicError


def new_id(prefix: str) -> str:
    """Anthropic-style ids: `msg_…`, `toolu_…`."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
