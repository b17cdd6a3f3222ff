"""TGI routes: POST /generate, POST /generate_stream (SSE), and POST / (TGI's compatibility route)."""

import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError, validation
from app.api.generation import (
    Context,
    ContextDep,
    Generation,
    check_refused,
    check_stop,
    resolve_max_new_tokens,
    run_to_completion,
    sse_json,
    tokenize_prompt,
)
from app.api.schemas import (
    CompatRequest,
    Details,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamEvent,
    TokenOut,
)
from app.api.structured import compile_grammar, tgi_spec
from app.engine.core.types import Completion, Token

router = APIRouter(tags=["generate (TGI)"])

ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid input"},
    429: {"model": ErrorBody, "description": "Queue full"},
    503: {"model": ErrorBody, "description": "Not ready or shutting down"},
    504: {"model": ErrorBody, "description": "Request timed out"},
}


async def start_generation(ctx: Context, body: GenerateRequest) -> Generation:
    p = body.parameters
    service = ctx.service
    ctx.usage["prompt"] = body.inputs
    if p.watermark:
        raise validation("`watermark` is not supported by this server", "parameters.watermark")
    check_refused(p, "parameters.")
    assert service.loaded is not None
    # Tokenizing a large prompt takes seconds: off the event loop, so /health and streams go on.
    ids = await run_in_threadpool(tokenize_prompt, service, body.inputs, p.truncate)
    max_new = resolve_max_new_tokens(
        service.loaded.limits, len(ids), p.max_new_tokens, service.settings.max_new_tokens_default
    )
    min_new = p.min_new_tokens or 0
    if min_new > max_new:
        raise validation(
            f"`min_new_tokens` ({min_new}) must be <= `max_new_tokens` ({max_new})", "parameters.min_new_tokens"
        )
    stopping = p.to_stopping_params(max_new, check_stop(service, p.stop))
    grammar = await compile_grammar(ctx, tgi_spec(p.grammar), "parameters.grammar")
    adapter = p.adapter_id if p.adapter_id not in (None, service.model_name) else None
    try:
        return Generation(ctx, ids, p.to_sampling_params(), stopping, p.decoder_input_details, grammar, adapter)
    except APIError as exc:
        if exc.error_type == "model_not_found":  # TGI answers an unknown adapter with 422
            raise validation(f"`adapter_id`: {exc.message}", "parameters.adapter_id") from exc
        raise


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


def token_out(t: Token) -> TokenOut:
    return TokenOut(id=t.id, text=t.text, logprob=_logprob(t.logprob), special=t.special)


def _top_tokens(t: Token) -> list[TokenOut] | None:
    if t.top is None:
        return None
    return [token_out(c) for c in t.top]


def generate_response(body: GenerateRequest, c: Completion) -> JSONResponse:
    """TGI omits `details` unless asked, but keeps null logprobs inside it."""
    text = body.inputs + c.text if body.parameters.return_full_text else c.text
    if not body.parameters.details:
        return JSONResponse({"generated_text": text})
    prefill = [PrefillToken(id=t.id, text=t.text, logprob=_logprob(t.logprob)) for t in c.prefill or []]
    top = [_top_tokens(t) or [] for t in c.tokens] if body.parameters.top_n_tokens else None
    details = Details(
        finish_reason=c.finish_reason,
        generated_tokens=c.generated_tokens,
        seed=c.seed,
        prefill=prefill,
        tokens=[token_out(t) for t in c.tokens],
        top_tokens=top,
    )
    return JSONResponse({"generated_text": text, "details": details.model_dump(exclude_none=False)})


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request, ctx: ContextDep):
    """Generate text for one prompt (TGI's request and response shapes)."""
    generation = await start_generation(ctx, body)
    (completion,) = await run_to_completion(request, [generation])
    return generate_response(body, completion)


async def stream_events(body: GenerateRequest, generation: Generation) -> AsyncIterator[str]:
    index = 0
    try:
        async for event in generation.events():
            for k, token in enumerate(event.tokens):
                index += 1
                out = StreamEvent(index=index, token=token_out(token), top_tokens=_top_tokens(token))
                if k == len(event.tokens) - 1:
                    _finish(body, out, event.completion)
                yield sse_json(out.model_dump())
    except APIError as exc:
        yield sse_json({"error": exc.message, "error_type": exc.error_type})


def _finish(body: GenerateRequest, out: StreamEvent, c: Completion | None) -> None:
    """The last event of a stream carries generated_text (the streamed texts joined) and details."""
    if c is not None:
        out.generated_text = body.inputs + c.text if body.parameters.return_full_text else c.text
        out.details = StreamDetails(
            finish_reason=c.finish_reason,
            generated_tokens=c.generated_tokens,
            seed=c.seed,
        )


async def streaming_response(body: GenerateRequest, ctx: Context) -> StreamingResponse:
    generation = await start_generation(ctx, body)  # raises 4xx/429 before the stream opens
    return StreamingResponse(
        stream_events(body, generation),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/generate_stream",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
async def generate_stream(body: GenerateRequest, ctx: ContextDep) -> StreamingResponse:
    """Stream tokens as server-sent events; the last event carries generated_text and details."""
    return await streaming_response(body, ctx)


@router.post(
    "/",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON or SSE"}},
)
async def compat(body: CompatRequest, request: Request, ctx: ContextDep):
    """TGI's compatibility route (huggingface_hub's InferenceClient posts here): /generate, or
    /generate_stream when `stream` is true."""
    if body.stream:
        return await streaming_response(body, ctx)
    return await generate(body, request, ctx)
