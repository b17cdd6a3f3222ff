"""POST /api/generate and /api/chat: Ollama's bodies become the internal ChatRequest (templated) or
CompletionRequest (raw), run through the chat/completions building blocks, and come back as
Ollama's objects: NDJSON chunks by default (`stream` true), the last with `done: true`, the
done reason, counts and durations."""

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError, validation
from app.api.generation import Context, ContextDep, Generation, run_to_completion, tokenize_prompt
from app.api.ollama import protocol
from app.api.ollama.convert import (
    DONE_REASON,
    as_ndjson,
    chat_messages,
    check_logprobs,
    check_think,
    created_at,
    format_spec,
    keep_alive_seconds,
    max_new_tokens,
    resolve_model,
    sampling_fields,
    stats,
)
from app.api.ollama.tool_output import ToolOutput
from app.api.openai.chat import chat_template_of, render_prompt
from app.api.openai.common import adapter_of, merged, start_choices
from app.api.openai.logprobs import chat_logprobs
from app.api.openai.protocol import ChatRequest, CompletionRequest, SamplingFields
from app.api.openai.tools import ToolPlan, template_renders_tools, tool_plan
from app.api.structured import compile_grammar, openai_spec
from app.engine.core.types import Completion, Token

router = APIRouter(tags=["Ollama"])
ERRORS: dict[int | str, dict] = {code: {"description": '{"error": "..."}'} for code in (400, 404, 429, 503, 504)}
NDJSON = "application/x-ndjson"

# The part of an Ollama object that carries output: {"response": text} or {"message": {...}}.
Shape = Callable[[str, list[dict] | None], dict]


def _generate_shape(text: str, calls: list[dict] | None) -> dict:
    return {"response": text}


def _chat_shape(text: str, calls: list[dict] | None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


@dataclass
class Run:
    """One Ollama request turned into the internal one, ready to generate."""

    model: str
    started: float  # time.perf_counter() at arrival: total_duration counts from here
    internal: SamplingFields
    ids: list[int]
    shape: Shape
    plan: ToolPlan | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    context: bool = False  # /api/generate's `context` in the final object


def _internal(cls: type[SamplingFields], **fields: Any) -> Any:
    """The internal request; its checks name Ollama's `options` (they hold every sampling field)."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error["loc"])
        raise validation(f"`options`: {where}: {error['msg']}", "options") from None


def _loaded(model: str, shape: dict) -> JSONResponse:
    """Ollama's answer to a request with nothing to generate: the model is loaded (it always is)."""
    return JSONResponse({"model": model, "created_at": created_at(), **shape, "done": True, "done_reason": "load"})


def _check_common(body: protocol.GenerateRequest | protocol.ChatRequest) -> tuple[dict[str, Any], int]:
    keep_alive_seconds(body.keep_alive)
    check_think(body.think)
    top = check_logprobs(body.logprobs, body.top_logprobs)
    return sampling_fields(body.options), top


@router.post("/api/generate", responses={**ERRORS, 200: {"content": {NDJSON: {}}}})
async def generate(body: protocol.GenerateRequest, request: Request, ctx: ContextDep):
    """Ollama's completion: the prompt (and `system`) rendered by the chat template, or used as is
    with `raw` (or when the model has no chat template, as Ollama's default `{{ .Prompt }}`)."""
    started = time.perf_counter()
    service = ctx.service
    model = resolve_model(service, body.model)
    fields, top = _check_common(body)
    if body.images:
        raise validation("`images`: this server runs text-only models; send no images", "images")
    for name in ("width", "height", "steps"):
        if getattr(body, name) is not None:
            raise validation(f"`{name}` is for image generation, which this server does not do", name)
    if body.template:
        raise validation(
            "`template` is not supported: the model's Jinja chat template (or TEXTGEN_CHAT_TEMPLATE) renders prompts",
            "template",
        )
    if body.suffix:
        raise validation(f"`suffix`: {model} does not support insert (fill-in-the-middle)", "suffix")
    if not body.prompt and not body.context:
        return _loaded(model, {"response": ""})
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    context = list(body.context or [])
    if context and max(context) >= len(tok):
        raise validation(f"`context` token id {max(context)} is outside the vocabulary ({len(tok)})", "context")
    template = None if body.raw else chat_template_of(service)
    response_format = format_spec(body.format)
    prompt = body.prompt or ""
    ctx.usage["prompt"] = prompt
    if template is None:
        if body.system:
            why = "with `raw: true`" if body.raw else "for a model without a chat template"
            raise validation(f"`system` has no place in the prompt {why}: put it in `prompt`", "system")
        internal = _internal(CompletionRequest, model=model, prompt=prompt, response_format=response_format, **fields)
        if context:
            ids = await run_in_threadpool(lambda: tok(prompt, add_special_tokens=False)["input_ids"])
        else:
            ids = await run_in_threadpool(tokenize_prompt, service, prompt)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": prompt})
        internal = _internal(ChatRequest, model=model, messages=messages, response_format=response_format, **fields)
        ids = await run_in_threadpool(render_prompt, service, internal)
    run = Run(model, started, internal, context + ids, _generate_shape, None, body.logprobs, top, not body.raw)
    return await _respond(ctx, request, run, body.options, body.stream, "prompt")


@router.post("/api/chat", responses={**ERRORS, 200: {"content": {NDJSON: {}}}})
async def chat(body: protocol.ChatRequest, request: Request, ctx: ContextDep):
    """Ollama's chat: messages rendered by the chat template; with `tools`, the answer is free
    text or tool calls in `message.tool_calls` (`arguments` an object)."""
    started = time.perf_counter()
    service = ctx.service
    model = resolve_model(service, body.model)
    fields, top = _check_common(body)
    messages = chat_messages(body.messages)
    if not messages:
        return _loaded(model, {"message": {"role": "assistant", "content": ""}})
    template = chat_template_of(service)
    if not template:
        raise validation(
            "this model has no chat template, so /api/chat cannot format messages: use /api/generate with "
            "`raw: true`, or start the server with TEXTGEN_CHAT_TEMPLATE=/path/to/template.jinja",
            "messages",
        )
    tools = body.tools or None
    if tools and not template_renders_tools(template):
        raise validation(f"`tools`: {model} does not support tools (its chat template does not render them)", "tools")
    if tools and body.format:
        raise validation("send `tools` or `format`, not both", "format")
    internal = _internal(
        ChatRequest, model=model, messages=messages, tools=tools, response_format=format_spec(body.format), **fields
    )
    extra_keys = service.settings.json_additional_properties
    plan = tool_plan(internal.tools, None, None, template, extra_keys) if tools else None
    ctx.usage["prompt"] = messages
    ids = await run_in_threadpool(render_prompt, service, internal)
    run = Run(model, started, internal, ids, _chat_shape, plan, body.logprobs, top)
    return await _respond(ctx, request, run, body.options, body.stream, "messages")


async def _respond(
    ctx: Context, request: Request, run: Run, options: protocol.Options | None, stream: bool | None, prompt_field: str
) -> Any:
    service = ctx.service
    assert service.loaded is not None
    spec, _ = openai_spec(run.internal)
    if run.plan is not None:
        spec = run.plan.spec
    grammar = await compile_grammar(ctx, spec, "tools" if run.plan is not None else "format")
    max_new = max_new_tokens(service, service.loaded.limits, options, len(run.ids), prompt_field)
    generations = start_choices(
        ctx,
        run.internal,
        [run.ids],
        max_new,
        top_logprobs=run.top_logprobs,
        prompt_field=prompt_field,
        grammar=grammar,
        adapter=adapter_of(service, run.model),
    )
    if stream is not False:  # Ollama streams unless told not to (null included)
        return StreamingResponse(_stream(run, generations), media_type=NDJSON)
    (completion,) = await run_to_completion(request, generations)
    whole = ToolOutput(run.plan).feed(completion.text, completion.tokens, completion)
    assert whole is not None  # the output is complete: nothing is held
    text, calls, _ = whole
    out = _head(run) | run.shape(text, calls)
    if run.logprobs:
        out["logprobs"] = _logprobs(completion.tokens)
    return JSONResponse(out | _final(run, completion))


def _head(run: Run) -> dict:
    return {"model": run.model, "created_at": created_at()}


def _logprobs(tokens: list[Token]) -> list[dict]:
    """Ollama's logprobs: OpenAI chat's entries ({token, logprob, bytes, top_logprobs})."""
    return chat_logprobs(tokens)["content"]


def _final(run: Run, completion: Completion) -> dict:
    out: dict[str, Any] = {"done": True, "done_reason": DONE_REASON[completion.finish_reason]}
    out |= stats(run.started, completion)
    if run.context:  # as Ollama: the conversation so far, for the deprecated `context` field
        out["context"] = run.ids + [t.id for t in completion.tokens]
    return out


async def _stream(run: Run, generations: list[Generation]) -> AsyncIterator[str]:
    """One NDJSON object per step with output, then the final one; an error is an `error` line."""
    output = ToolOutput(run.plan)
    try:
        async for _, event in merged(generations):
            piece = output.feed(event.text, list(event.tokens), event.completion)
            if piece is not None:
                text, calls, tokens = piece
                if text or calls or (run.logprobs and tokens):
                    yield as_ndjson(_chunk(run, text, calls, tokens))
            if event.completion is not None:
                yield as_ndjson(_head(run) | run.shape("", None) | _final(run, event.completion))
    except APIError as exc:
        yield as_ndjson({"error": exc.message})


def _chunk(run: Run, text: str, calls: list[dict] | None, tokens: list[Token]) -> dict:
    out = _head(run) | run.shape(text, calls) | {"done": False}
    if run.logprobs:
        out["logprobs"] = _logprobs(tokens)
    return out
