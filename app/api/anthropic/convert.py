"""Messages request -> the internal chat request (app/api/openai/protocol.ChatRequest), and a
finished generation -> Anthropic content blocks. Everything else (templating, tool grammars,
sampling, limits) is the chat route's, so the two families cannot drift apart."""

import json
from typing import Any

from pydantic import ValidationError

from app.api.anthropic.protocol import CountTokensRequest, InputMessage, MessagesRequest, new_id
from app.api.errors import APIError, validation
from app.api.openai.protocol import ChatMessage, ChatRequest
from app.api.openai.tools import ToolPlan, collect
from app.engine.core.types import Completion

STOP_REASON = {"eos_token": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens"}
# Tool keys that ask for nothing beyond a plain client tool (textgen's tool grammar is always strict).
_TOOL_KEYS = {"name", "description", "input_schema", "type", "cache_control", "strict"}


def _texts(blocks: list[dict[str, Any]], field: str) -> str:
    """The joined text of text blocks; any other block is a 400 naming it."""
    out = []
    for k, block in enumerate(blocks):
        kind = block.get("type")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise validation(
                f"`{field}[{k}]` must be a text block ({{'type': 'text', 'text': ...}}); got type {kind!r}: "
                "this server runs text-only models",
                f"{field}.{k}",
            )
        out.append(block["text"])
    return "".join(out)


def _system(system: str | list[dict[str, Any]] | None) -> list[ChatMessage]:
    if system is None:
        return []
    text = system if isinstance(system, str) else _texts(system, "system")
    return [ChatMessage(role="system", content=text)]


def _message(message: InputMessage, i: int) -> list[ChatMessage]:
    """One Messages message as chat messages: `tool_result` blocks become `tool` messages (before
    the user's text), `tool_use` blocks the assistant's `tool_calls`."""
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    texts: list[str] = []
    calls: list[dict] = []
    results: list[ChatMessage] = []
    for k, block in enumerate(message.content):
        kind, where = block.get("type"), f"messages.{i}.content.{k}"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and message.role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                raise validation(f"`{where}` must have a `name` and an object `input`", where)
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind == "tool_result" and message.role == "user":
            content = block.get("content", "")
            text = content if isinstance(content, str) else _texts(content, f"{where}.content")
            result: dict[str, Any] = {
                "role": "tool",
                "content": text,
                "tool_call_id": str(block.get("tool_use_id", "")),
            }
            if block.get("is_error"):
                result["is_error"] = True  # reaches the template, as every message field does
            results.append(ChatMessage.model_validate(result))
        else:
            raise validation(
                f"`{where}` has type {kind!r}, which a {message.role} message here cannot carry: send text, "
                "tool_use (assistant) or tool_result (user) blocks; image and document blocks are refused "
                "(this server runs text-only models)",
                where,
            )
    out = list(results)
    if texts or calls or not results:
        reply: dict[str, Any] = {"role": message.role, "content": "".join(texts) if texts or not calls else None}
        if calls:
            reply["tool_calls"] = calls
        out.append(ChatMessage.model_validate(reply))
    return out


def _tools(tools: list[dict[str, Any]] | None) -> list[dict] | None:
    """Anthropic client tools as chat `tools`; server tools (web search, bash, ...) are refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom"):
            raise validation(
                f"`tools[{i}]` has type {tool.get('type')!r}: server tools are not supported, only client "
                "tools ({name, description, input_schema})",
                f"tools.{i}.type",
            )
        unknown = sorted(k for k, v in tool.items() if k not in _TOOL_KEYS and v not in (None, False, []))
        if unknown:
            raise validation(
                f"`tools[{i}].{unknown[0]}` is not supported by this server; omit it", f"tools.{i}.{unknown[0]}"
            )
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise validation(f"`tools[{i}]` needs a `name` and an `input_schema` object", f"tools.{i}")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: dict[str, Any] | None, tools: list[dict] | None) -> tuple[Any, bool | None]:
    """Chat's `tool_choice` and `parallel_tool_calls` for Anthropic's `tool_choice`."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "auto":
        return ("auto" if tools else None), parallel
    if kind == "none":
        return "none", None
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, False
    raise validation(
        "`tool_choice` must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}", "tool_choice"
    )


def format_schema(output_config: Any) -> dict | None:
    """The JSON schema `output_config.format` asks for, or None."""
    fmt = output_config.format if output_config is not None else None
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise validation(
            "`output_config.format` must be {'type': 'json_schema', 'schema': {...}}", "output_config.format"
        )
    return fmt["schema"]


def to_chat(body: MessagesRequest | CountTokensRequest, model: str) -> ChatRequest:
    """The chat request that renders and samples exactly what `body` asks for. An assistant
    message last is a prefill: the answer continues it (Anthropic's semantics)."""
    messages = _system(body.system)
    for i, m in enumerate(body.messages):
        messages += _message(m, i)
    tools = _tools(body.tools)
    choice, parallel = _tool_choice(body.tool_choice, tools)
    prefill = body.messages[-1].role == "assistant"
    fields: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
        "add_generation_prompt": not prefill,
        "continue_final_message": prefill,
    }
    if isinstance(body, MessagesRequest):
        fields |= {
            "max_tokens": body.max_tokens,
            "stop": body.stop_sequences,
            "stream": body.stream,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": body.top_k,
        }
    try:
        return ChatRequest(**fields)
    except ValidationError as exc:  # a value our own model let through but chat's refuses
        raise APIError(400, f"invalid request: {exc.errors()[0].get('msg')}", "validation", "messages") from None


def tool_use(call: dict) -> dict | None:
    """A parsed chat tool call as a `tool_use` block; None when its arguments are not a JSON object."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        return None
    if not isinstance(arguments, dict):
        return None
    return {"type": "tool_use", "id": new_id("toolu"), "name": call["function"]["name"], "input": arguments}


def output_blocks(plan: ToolPlan | None, completion: Completion) -> tuple[list[dict], str]:
    """Content blocks and `stop_reason` of a finished generation. The one place tool output is
    read: only a call the grammar completed (the output ended as if EOS came) and whose input
    parses is a `tool_use`; anything else is text with the generation's own stop reason."""
    text, reason = completion.text, STOP_REASON[completion.finish_reason]
    if plan is not None and completion.finish_reason == "eos_token":
        out = collect(plan, text, "stop")  # chat's reading of tool output, shared by every family
        blocks = [tool_use(c.openai()) for c in out.calls] if out.finish == "tool_calls" else []
        if blocks and all(b is not None for b in blocks):
            return [b for b in blocks if b is not None], "tool_use"
    return ([{"type": "text", "text": text}] if text else []), reason
