"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API).

The request becomes the internal chat request (convert.to_chat), then runs through the chat
route's pieces: chat template, tool grammar, sampling, limits. Streams are Anthropic's SSE events:
message_start, content_block_start / _delta (text_delta, input_json_delta) / _stop,
message_delta (stop_reason, usage), message_stop; an error mid-stream is an `error` event.
"""

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.anthropic.convert import STOP_REASON, format_schema, output_blocks, to_chat
from app.api.anthropic.protocol import (
    AnthropicErrorBody,
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessagesRequest,
    Usage,
    new_id,
)
from app.api.errors import APIError, anthropic_body, validation
from app.api.generation import ContextDep, Generation, check_refused, run_to_completion
from app.api.openai.chat import chat_template_of, count_messages_first, render_prompt
from app.api.openai.common import adapter_of, check_model, merged, start_choices
from app.api.openai.protocol import ChatRequest
from app.api.openai.tools import ToolPlan, tool_plan
from app.api.structured import compile_grammar
from app.engine.core.constraints import GrammarSpec
from app.engine.core.types import Completion
from app.service import Service

router = APIRouter(tags=["Anthropic"])
ERRORS: dict[int | str, dict] = {code: {"model": AnthropicErrorBody} for code in (400, 401, 404, 429, 503, 504)}


def _plan(service: Service, chat: ChatRequest, schema: dict | None) -> tuple[ToolPlan | None, GrammarSpec | None]:
    """The tool plan and the grammar the request asks for (tools or `output_config.format`)."""
    template = chat_template_of(service)
    if not template:
        raise validation(
            "this model has no chat template, so `messages` cannot be rendered: start the server with "
            "TEXTGEN_CHAT_TEMPLATE=/path/to/template.jinja (a Jinja chat template), or use /v1/completions",
            "messages",
        )
    s = service.settings
    plan = tool_plan(
        chat.tools, chat.tool_choice, chat.parallel_tool_calls, template, s.json_additional_properties, s.max_tool_calls
    )
    if plan is not None and schema is not None:
        raise validation(
            "send `tools` (with a tool_choice other than 'none') or `output_config.format`, not both",
            "output_config.format",
        )
    if plan is not None:
        return plan, plan.spec
    return None, GrammarSpec.json_schema(schema) if schema is not None else None


def _usage(prompt_tokens: int, completion: Completion) -> Usage:
    cached = completion.cached_tokens
    return Usage(
        input_tokens=prompt_tokens - cached, output_tokens=completion.generated_tokens, cache_read_input_tokens=cached
    )


@router.post("/v1/messages", response_model=Message, responses=ERRORS | {200: {"content": {"text/event-stream": {}}}})
async def messages(body: MessagesRequest, request: Request, ctx: ContextDep):
    """Anthropic's Messages API over the chat template (docs/api.md, "Anthropic: /v1/messages")."""
    service = ctx.service
    model = check_model(service, body.model)
    check_refused(body)
    stops = body.stop_sequences or []
    if any(not s for s in stops):
        raise validation("`stop_sequences` strings must not be empty", "stop_sequences")
    if len(stops) > service.settings.max_stop_sequences:
        raise validation(
            f"`stop_sequences` has {len(stops)} strings; at most {service.settings.max_stop_sequences} are allowed",
            "stop_sequences",
        )
    chat = to_chat(body, model)
    plan, spec = _plan(service, chat, format_schema(body.output_config))
    await run_in_threadpool(count_messages_first, service, chat.messages)
    ids = await run_in_threadpool(render_prompt, service, chat)  # templating is slow work
    ctx.usage["prompt"] = [m.model_dump() for m in chat.messages]
    grammar = await compile_grammar(ctx, spec, "tools" if plan is not None else "output_config.format.schema")
    generations = start_choices(
        ctx, chat, [ids], body.max_tokens, prompt_field="messages", grammar=grammar, adapter=adapter_of(service, model)
    )
    if body.stream:
        return StreamingResponse(_stream(model, generations[0], len(ids), plan), media_type="text/event-stream")
    (completion,) = await run_to_completion(request, generations)
    content, reason = output_blocks(plan, completion)
    return Message(
        id=new_id("msg"),
        model=model,
        content=content,
        stop_reason=reason,
        stop_sequence=completion.stop_string if reason == "stop_sequence" else None,
        usage=_usage(len(ids), completion),
    )


@router.post("/v1/messages/count_tokens", response_model=CountTokensResponse, responses=ERRORS)
async def count_tokens(body: CountTokensRequest, ctx: ContextDep) -> CountTokensResponse:
    """The number of prompt tokens `/v1/messages` would render for the same messages, system and tools."""
    service = ctx.service
    model = check_model(service, body.model)
    check_refused(body)
    chat = to_chat(body, model)
    _plan(service, chat, format_schema(body.output_config))  # the same checks as /v1/messages
    await run_in_threadpool(count_messages_first, service, chat.messages)
    ids = await run_in_threadpool(render_prompt, service, chat)
    return CountTokensResponse(input_tokens=len(ids))


def sse(kind: str, payload: dict) -> str:
    """One Anthropic server-sent event: `event: <type>` then its JSON."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


def _block(index: int, start: dict, delta: dict | None) -> list[str]:
    """A whole content block: start, one delta, stop."""
    out = [sse("content_block_start", {"index": index, "content_block": start})]
    if delta is not None:
        out.append(sse("content_block_delta", {"index": index, "delta": delta}))
    out.append(sse("content_block_stop", {"index": index}))
    return out


async def _stream(model: str, generation: Generation, prompt_tokens: int, plan: ToolPlan | None) -> AsyncIterator[str]:
    """Text streams as it is generated. With tools, output that may be a tool call is held until
    it is complete and parses (then tool_use blocks, else one text block), so a client never sees
    half a call. Free text under tool_choice auto (it cannot start a call) streams at once."""
    start = Message(
        id=new_id("msg"),
        model=model,
        content=[],
        stop_reason=None,
        usage=Usage(input_tokens=prompt_tokens, output_tokens=0),
    )
    yield sse("message_start", {"message": start.model_dump()})
    yield sse("ping", {})
    held: str | None = "" if plan is not None else None  # None: streaming free text
    text_open = False
    try:
        async for _, event in merged([generation]):
            if (
                held is not None
                and plan is not None
                and plan.mode == "auto"
                and not held
                and event.text[:1] not in ("", "<")
            ):
                held = None  # a call starts with its tag: this is free text
            if held is not None:
                held += event.text
            elif event.text:
                if not text_open:
                    yield sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": event.text}})
            completion = event.completion
            if completion is None:
                continue
            if text_open:
                yield sse("content_block_stop", {"index": 0})
                reason = STOP_REASON[completion.finish_reason]
            else:
                blocks, reason = output_blocks(plan, completion)
                for index, block in enumerate(blocks):
                    if block["type"] == "text":
                        delta = {"type": "text_delta", "text": block["text"]}
                        for line in _block(index, {"type": "text", "text": ""}, delta):
                            yield line
                    else:
                        arguments = json.dumps(block["input"], ensure_ascii=False)
                        delta = {"type": "input_json_delta", "partial_json": arguments}
                        for line in _block(index, block | {"input": {}}, delta):
                            yield line
            usage = _usage(prompt_tokens, completion).model_dump()
            stop_sequence = completion.stop_string if reason == "stop_sequence" else None
            yield sse(
                "message_delta", {"delta": {"stop_reason": reason, "stop_sequence": stop_sequence}, "usage": usage}
            )
            yield sse("message_stop", {})
    except APIError as exc:
        yield f"event: error\ndata: {json.dumps(anthropic_body(exc), ensure_ascii=False)}\n\n"
