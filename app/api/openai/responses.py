"""POST /v1/responses: OpenAI's Responses API as a thin conversion onto chat.

The request becomes the internal `ChatRequest` (instructions and input items become chat messages,
function tools become chat tools, `text.format` becomes `response_format`) and runs through chat's
own building blocks: the chat template, the tool plan, the grammar, the engine. The results come
back as Responses output items, usage and typed SSE events. Stateless: nothing is stored.
"""

import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.errors import OPENAI_TYPES, APIError, validation
from app.api.generation import ContextDep, Generation, check_refused, run_to_completion
from app.api.openai.chat import chat_template_of, render_prompt
from app.api.openai.common import FINISH, SSE_RESPONSES, adapter_of, cached_tokens, check_model, merged, start_choices
from app.api.openai.logprobs import chat_logprobs
from app.api.openai.protocol import ChatRequest
from app.api.openai.responses_protocol import (
    ResponsesRequest,
    function_call_item,
    item_id,
    message_item,
    now,
    output_text,
    usage,
)
from app.api.openai.tools import ToolPlan, collect, tool_plan
from app.api.structured import compile_grammar, openai_spec
from app.engine.core.types import Completion, Token

router = APIRouter(tags=["OpenAI"])

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text")
LOGPROBS = "message.output_text.logprobs"
# `include` values served: logprobs, and one that asks for nothing this server holds (with no
# reasoning items there is no encrypted reasoning to return; Codex always sends it).
INCLUDABLE = (LOGPROBS, "reasoning.encrypted_content")
# The chat route's field names, as Responses spells them (errors name the client's own fields).
RENAMED = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_new_tokens": "max_output_tokens",  # the engine's 413 when prompt + output exceed the KV budget
    "response_format": "text.format",
}


@contextlib.contextmanager
def responses_names() -> Iterator[None]:
    """Errors raised by chat's building blocks, naming Responses' fields instead of chat's."""
    try:
        yield
    except APIError as exc:
        for chat_name, name in RENAMED.items():
            exc.message = exc.message.replace(f"`{chat_name}`", f"`{name}`")
            if exc.param is not None and exc.param.split(".")[0] == chat_name:
                exc.param = name + exc.param[len(chat_name) :]
        raise


def _text_of(parts: Any, field: str, allowed: tuple[str, ...]) -> str:
    """The text of a content value: a string, or a list of text parts (anything else is a 400)."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise validation(f"`{field}` must be a string or a list of content parts", field)
    texts = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise validation(
                f"`{field}[{k}]` has type {kind!r}; this model takes text only ({', '.join(allowed)})",
                f"{field}[{k}]",
            )
        if not isinstance(part.get("text"), str):
            raise validation(f"`{field}[{k}].text` must be a string", f"{field}[{k}].text")
        texts.append(part["text"])
    return "".join(texts)


def _refusal_as_text(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "refusal":
        return part | {"text": part.get("refusal")}
    return part


def _required_str(item: dict, key: str, field: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise validation(f"`{field}.{key}` must be a string", f"{field}.{key}")
    return value


def messages_of(body: ResponsesRequest) -> list[dict]:
    """Chat messages of `instructions` and `input`. Consecutive `function_call` items join the
    assistant message before them (one turn's calls); `developer` is rendered as `system`, which
    every chat template knows, and consecutive system messages become one."""
    messages: list[dict] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    if not body.input:
        raise validation("`input` must not be empty", "input")
    for i, item in enumerate(body.input):
        field = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            role = ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise validation(f"`{field}.role` must be one of {', '.join(ROLES)}", f"{field}.role")
            allowed = (*TEXT_PARTS, "refusal") if role == "assistant" else TEXT_PARTS
            content = item.get("content")
            if isinstance(content, list):  # an assistant's refusal part carries its text as `refusal`
                content = [_refusal_as_text(part) for part in content]
            text = _text_of(content, f"{field}.content", allowed)
            if role == "system" and messages and messages[-1]["role"] == "system":
                # One system message: many chat templates take only one (Codex sends instructions
                # and then developer messages).
                messages[-1]["content"] += "\n\n" + text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call = {
                "id": _required_str(item, "call_id", field),
                "type": "function",
                "function": {
                    "name": _required_str(item, "name", field),
                    "arguments": _required_str(item, "arguments", field),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _text_of(item.get("output"), f"{field}.output", ("input_text",))
            messages.append({"role": "tool", "tool_call_id": _required_str(item, "call_id", field), "content": output})
        else:
            raise validation(
                f"`{field}.type` {kind!r} is not supported: send messages, function_call and "
                "function_call_output items (this server is stateless and returns no reasoning items)",
                f"{field}.type",
            )
    return messages


def tools_of(tools: list[dict] | None) -> list[dict] | None:
    """Responses' flat function tools as chat tools; any other tool type is a 400 naming it."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise validation(f"`tools[{i}].type` {kind!r} is not supported; only 'function' tools are", f"tools[{i}]")
        name, params = tool.get("name"), tool.get("parameters")
        if not isinstance(name, str) or not name:
            raise validation(f"`tools[{i}].name` must be a non-empty string", f"tools[{i}].name")
        if params is not None and not isinstance(params, dict):
            raise validation(f"`tools[{i}].parameters` must be a JSON schema object", f"tools[{i}].parameters")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def tool_choice_of(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise validation(
                "`tool_choice` must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}; "
                f"got {json.dumps(choice)}",
                "tool_choice",
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def response_format_of(fmt: dict | None) -> dict | None:
    """`text.format` as chat's `response_format`."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise validation(
            f"`text.format.type` {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
            "text.format.type",
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise validation("`text.format.schema` must be a JSON schema (an object)", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), "schema": schema}}


def check_accepted(body: ResponsesRequest) -> None:
    """Refused fields, and the accepted fields' values that ask for something not done here."""
    for name in ("store", "previous_response_id", "conversation"):
        value = getattr(body, name)
        if value is not None and value is not False:
            raise validation(
                f"`{name}` is not supported: this server is stateless (nothing is stored), so send the "
                "whole conversation in `input`",
                name,
            )
    check_refused(body)
    for value in body.include or []:
        if value not in INCLUDABLE:
            raise validation(
                f"`include` value {value!r} is not supported (only {', '.join(INCLUDABLE)})",
                "include",
            )
    if body.stream_options is not None and not body.stream:
        raise validation("`stream_options` is only allowed with `stream: true`", "stream_options")


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Logprobs are returned with `include: ["message.output_text.logprobs"]`, or when
    `top_logprobs` asks for candidates (which would otherwise be ignored)."""
    return LOGPROBS in (body.include or []) or bool(body.top_logprobs)


def logprobs_of(tokens: list[Token]) -> list[dict]:
    """`output_text.logprobs` (and a delta's): chat's logprobs entries, the same fields."""
    return chat_logprobs(tokens)["content"]


def chat_request(body: ResponsesRequest) -> ChatRequest:
    """The internal chat request that runs this Responses request."""
    fields = {
        "model": body.model,
        "messages": messages_of(body),
        "tools": tools_of(body.tools),
        "tool_choice": tool_choice_of(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "max_tokens": body.max_output_tokens,
        "logprobs": wants_logprobs(body),
        "top_logprobs": body.top_logprobs,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "response_format": response_format_of(body.text.format if body.text else None),
    }
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as exc:  # items whose values chat refuses (e.g. an unpaired surrogate)
        error = exc.errors()[0]
        raise validation(f"`input`: {error.get('msg', 'invalid')}", "input") from None


def output_items(plan: ToolPlan | None, text: str, finish: str, logprobs: list[dict] | None = None) -> list[dict]:
    """One finished generation as output items: its tool calls when tools are active and the
    output parses as calls, else one assistant message (incomplete when cut by the token limit)
    with `logprobs`. Tool output is read by chat's `ToolCallOutput`, so every family agrees on
    what is a call: here, only calls that parse and were not cut (finish "tool_calls")."""
    out = collect(plan, text, "stop") if plan is not None and finish == "stop" else None
    if out is None or out.finish != "tool_calls":
        return [message_item(text, "incomplete" if finish == "length" else "completed", logprobs=logprobs)]
    return [function_call_item(c.id, c.name, c.arguments) for c in out.calls]


class Echo:
    """What every response object of one request repeats: ids, times and the request's settings."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.id = item_id("resp")
        self.created_at = now()
        fmt = (body.text.format if body.text else None) or {"type": "text"}
        self.fields = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": model,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt},
            "tool_choice": body.tool_choice or "auto",  # OpenAI echoes its default
            "tools": body.tools or [],
            "top_logprobs": body.top_logprobs or 0,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled",
            "user": body.user,
        }

    def response(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": now() if status == "completed" else None,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "output": output,
            "usage": usage,
            **self.fields,
        }


def _status(items: list[dict]) -> str:
    return "incomplete" if any(item["status"] == "incomplete" for item in items) else "completed"


@router.post("/v1/responses", responses=SSE_RESPONSES)
async def responses(body: ResponsesRequest, request: Request, ctx: ContextDep) -> Any:
    """OpenAI Responses over the chat machinery (docs/api.md, "OpenAI Responses")."""
    service = ctx.service
    model = check_model(service, body.model)
    check_accepted(body)
    chat = chat_request(body)
    template = chat_template_of(service)
    if not template:
        raise validation(
            "this model has no chat template, so /v1/responses cannot format `input`: start the server with "
            "TEXTGEN_CHAT_TEMPLATE=/path/to/template.jinja (a Jinja chat template), or send the text as `prompt` "
            "to /v1/completions",
            "input",
        )
    extra_keys = service.settings.json_additional_properties
    cap = service.settings.max_tool_calls
    plan = tool_plan(chat.tools, chat.tool_choice, chat.parallel_tool_calls, template, extra_keys, cap)
    with responses_names():
        spec, field = openai_spec(chat)
    if spec is not None:
        field = "text.format.schema" if chat.response_format["type"] == "json_schema" else "text.format"
    if plan is not None:
        if spec is not None:
            raise validation("send `tools` with tool_choice 'none', or a JSON `text.format`, not both", "text.format")
        spec, field = plan.spec, "tools"
    with responses_names():
        ids = await run_in_threadpool(render_prompt, service, chat)  # templating is slow work
    assert service.loaded is not None
    ctx.usage["prompt"] = [m.model_dump() for m in chat.messages]
    grammar = await compile_grammar(ctx, spec, field)
    with responses_names():
        generations = start_choices(
            ctx,
            chat,
            [ids],
            chat.max_tokens,
            prompt_field="input",
            # Omitted: up to the context's end, as OpenAI and vLLM (Codex never sends a limit).
            default_max_tokens=service.loaded.limits.max_total_tokens,
            grammar=grammar,
            adapter=adapter_of(service, model),
        )
    echo = Echo(body, model)
    if body.stream:
        stream = stream_events(echo, generations, len(ids), plan, chat.logprobs)
        return StreamingResponse(stream, media_type="text/event-stream")
    (result,) = await run_to_completion(request, generations)
    logprobs = logprobs_of(result.tokens) if chat.logprobs else None
    items = output_items(plan, result.text, FINISH[result.finish_reason], logprobs)
    return echo.response(_status(items), items, _usage(len(ids), result))


def _usage(prompt_tokens: int, result: Completion) -> dict:
    return usage(prompt_tokens, result.generated_tokens, cached_tokens([result], 1))


class Events:
    """Typed server-sent events: an `event:` line named as the `type`, and a numbered JSON body."""

    def __init__(self) -> None:
        self._sequence = itertools.count()

    def __call__(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": next(self._sequence), **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _item_events(event: Events, index: int, item: dict) -> Iterator[str]:
    """The events of one finished output item (a held tool call or message), sent at once."""
    if item["type"] == "message":
        part = item["content"][0]
        yield from _message_start(event, index, item["id"])
        if part["text"]:
            yield _text_delta(event, index, item["id"], part["text"], part["logprobs"])
        yield from _message_end(event, index, item)
        return
    yield event(
        "response.output_item.added", output_index=index, item=item | {"arguments": "", "status": "in_progress"}
    )
    ids = {"item_id": item["id"], "output_index": index}
    yield event("response.function_call_arguments.delta", **ids, delta=item["arguments"])
    yield event("response.function_call_arguments.done", **ids, name=item["name"], arguments=item["arguments"])
    yield event("response.output_item.done", output_index=index, item=item)


def _message_start(event: Events, index: int, message_id: str) -> Iterator[str]:
    yield event("response.output_item.added", output_index=index, item=message_item("", "in_progress", message_id))
    ids = {"item_id": message_id, "output_index": index, "content_index": 0}
    yield event("response.content_part.added", **ids, part=output_text(""))


def _text_delta(event: Events, index: int, message_id: str, delta: str, logprobs: list[dict]) -> str:
    ids = {"item_id": message_id, "output_index": index, "content_index": 0}
    return event("response.output_text.delta", **ids, delta=delta, logprobs=logprobs)


def _message_end(event: Events, index: int, item: dict) -> Iterator[str]:
    part = item["content"][0]
    ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
    yield event("response.output_text.done", **ids, text=part["text"], logprobs=part["logprobs"])
    yield event("response.content_part.done", **ids, part=part)
    yield event("response.output_item.done", output_index=index, item=item)


async def stream_events(
    echo: Echo, generations: list[Generation], prompt_tokens: int, plan: ToolPlan | None, logprobs: bool = False
) -> AsyncIterator[str]:
    """Responses' event stream. Text streams as it comes; with tools the output is held until it
    is complete, then sent as the calls (or message) it parses to, as the non-streamed answer."""
    event = Events()
    yield event("response.created", response=echo.response("in_progress", []))
    yield event("response.in_progress", response=echo.response("in_progress", []))
    message_id = item_id("msg")
    try:
        if plan is None:
            for line in _message_start(event, 0, message_id):
                yield line
        text = ""
        result: Completion | None = None
        async for _, update in merged(generations):
            text += update.text
            if plan is None and update.text:
                yield _text_delta(event, 0, message_id, update.text, logprobs_of(update.tokens) if logprobs else [])
            result = update.completion or result
        assert result is not None
        finish = FINISH[result.finish_reason]
        entries = logprobs_of(result.tokens) if logprobs else None
        if plan is None:
            items = [message_item(text, "incomplete" if finish == "length" else "completed", message_id, entries)]
            for line in _message_end(event, 0, items[0]):
                yield line
        else:
            items = output_items(plan, text, finish, entries)
            for index, item in enumerate(items):
                for line in _item_events(event, index, item):
                    yield line
        status = _status(items)
        final = echo.response(status, items, _usage(prompt_tokens, result))
        yield event(f"response.{status}", response=final)
    except APIError as exc:
        code = OPENAI_TYPES.get(exc.error_type, exc.error_type)
        yield event("error", code=code, message=exc.message, param=exc.param)
