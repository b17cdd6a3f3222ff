"""POST /v1/completions."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError
from app.api.generation import ContextDep, Generation, run_to_completion
from app.api.openai.common import FINISH, SSE_RESPONSES, check_model, start_choices, stream_choices
from app.api.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from app.engine.types import Completion, Event, Token
from app.service import Service

router = APIRouter(tags=["OpenAI"])


def prompts_of(service: Service, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt; prompts may be text or token ids."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    p = body.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            ids.append(tok(item)["input_ids"])
            texts.append(item)
        else:
            if max(item) >= len(tok):
                raise APIError(422, f"token id {max(item)} is outside the vocabulary ({len(tok)})", "validation")
            ids.append(list(item))
            texts.append(tok.decode(item, skip_special_tokens=True))
    return ids, texts


def _logprobs(tokens: list[Token], start_offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(None if t.logprob != t.logprob else t.logprob)  # NaN: first prompt token
        out.top_logprobs.append({text: lp for _, text, lp in t.top} if t.top else None)
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def choice_of(body: CompletionRequest, index: int, prompt_text: str, c: Completion) -> CompletionChoice:
    text = prompt_text + c.text if body.echo else c.text
    logprobs = None
    if body.logprobs is not None:
        tokens = (c.prefill or []) + c.tokens if body.echo else c.tokens
        logprobs = _logprobs(tokens, 0 if body.echo else len(prompt_text))
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=FINISH[c.finish_reason])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=SSE_RESPONSES,
)
async def completions(body: CompletionRequest, request: Request, ctx: ContextDep):
    """OpenAI text completions: string or list prompts, n choices, stop, seed, logprobs, echo, stream."""
    service = ctx.service
    model = check_model(service, body.model)
    ids, texts = await run_in_threadpool(prompts_of, service, body)  # tokenizing is slow work
    ctx.usage["prompt"] = texts
    generations = start_choices(
        ctx,
        body,
        ids,
        body.max_tokens,
        top_logprobs=body.logprobs or 0,
        prefill_details=body.echo and body.logprobs is not None,
    )
    prompt_tokens = sum(len(i) for i in ids)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(body, model, texts, generations, prompt_tokens, include_usage), media_type="text/event-stream"
        )
    results = await run_to_completion(request, generations)
    choices = [choice_of(body, i, texts[i // body.n], c) for i, c in enumerate(results)]
    completion_tokens = sum(c.generated_tokens for c in results)
    return CompletionResponse(
        id=new_id("cmpl"),
        created=now(),
        model=model,
        choices=choices,
        usage=Usage.of(prompt_tokens, completion_tokens),
    )


def _stream(
    body: CompletionRequest,
    model: str,
    texts: list[str],
    generations: list[Generation],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model}

    def choice(index: int, text: str, finish: str | None, logprobs: CompletionLogprobs | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs and logprobs.model_dump(), "finish_reason": finish}

    def render(index: int, event: Event, finish: str | None) -> dict | None:
        logprobs = None
        if body.logprobs is not None and event.token is not None:
            logprobs = _logprobs([event.token], 0)
        if event.text or finish or logprobs:
            return choice(index, event.text, finish, logprobs)
        return None

    first = [choice(i, texts[i // body.n], None) for i in range(len(generations))] if body.echo else []
    return stream_choices(head, generations, first, render, prompt_tokens, include_usage)
