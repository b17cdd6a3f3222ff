"""POST /v1/completions."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import validation
from app.api.generation import ContextDep, Generation, run_to_completion
from app.api.openai.common import (
    SSE_RESPONSES,
    adapter_of,
    cached_tokens,
    check_model,
    finish_of,
    start_choices,
    stream_choices,
    usage_flags,
)
from app.api.openai.logprobs import completion_logprobs
from app.api.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    new_id,
    now,
)
from app.api.structured import compile_grammar, openai_spec
from app.engine.core.constraints import Grammar
from app.engine.core.detokenize import render_text
from app.engine.core.types import Completion, Event
from app.service import Service

router = APIRouter(tags=["OpenAI"])


def prompts_of(service: Service, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt (text is tokenized; token ids are used verbatim, no BOS added)
    and each prompt's rendered text (what echo returns and offsets count from)."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    p = body.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    ids = []
    for item in items:
        if isinstance(item, str):
            ids.append(tok(item)["input_ids"])
        else:
            if max(item) >= len(tok):
                raise validation(f"`prompt` token id {max(item)} is outside the vocabulary ({len(tok)})", "prompt")
            ids.append(list(item))
    # Rendering is per-token Python work: even in a worker thread it holds the GIL and stalls the
    # event loop, so a prompt over the limit (refused right after) is not rendered.
    limit = service.loaded.limits.max_input_tokens
    return ids, [render_text(tok, i) if len(i) <= limit else "" for i in ids]


def choice_of(
    body: CompletionRequest, index: int, prompt_text: str, c: Completion, grammar: Grammar | None
) -> CompletionChoice:
    text = prompt_text + c.text if body.echo else c.text
    logprobs = None
    if body.logprobs is not None:
        tokens = (c.prefill or []) + c.tokens if body.echo else c.tokens
        logprobs = completion_logprobs(tokens, 0 if body.echo else len(prompt_text))
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_of(c, grammar))


def best(results: list[Completion], per_prompt: int, n: int) -> list[Completion]:
    """For each prompt's `per_prompt` results, the `n` with the highest cumulative logprob, best
    first (`best_of` asks for this ranking)."""
    out = []
    for start in range(0, len(results), per_prompt):
        group = results[start : start + per_prompt]
        out += sorted(group, key=lambda c: -sum(t.logprob for t in c.tokens))[:n]
    return out


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=SSE_RESPONSES,
)
async def completions(body: CompletionRequest, request: Request, ctx: ContextDep):
    """OpenAI text completions: string or list prompts, n choices, best_of, stop, seed, logprobs
    (with top candidates, also at echoed prompt positions), echo, stream."""
    service = ctx.service
    model = check_model(service, body.model)
    per_prompt = body.best_of or body.n
    if per_prompt < body.n:
        raise validation(f"`best_of` ({per_prompt}) must be >= `n` ({body.n})", "best_of")
    if body.stream and per_prompt > body.n:
        raise validation("`best_of` > `n` cannot be streamed: send stream=false", "best_of")
    ctx.usage["prompt"] = body.prompt if isinstance(body.prompt, str) else list(body.prompt)
    ids, texts = await run_in_threadpool(prompts_of, service, body)  # tokenizing is slow work
    grammar = await compile_grammar(ctx, *openai_spec(body))
    generations = start_choices(
        ctx,
        body,
        ids,
        body.max_tokens,
        prefill_details=body.echo and body.logprobs is not None,
        per_prompt=per_prompt,
        default_max_tokens=16,
        grammar=grammar,
        adapter=adapter_of(service, model),
    )
    prompt_tokens = sum(len(i) for i in ids)
    if body.stream:
        include_usage, continuous = usage_flags(body)
        stream = _stream(body, model, texts, generations, prompt_tokens, include_usage, continuous)
        return StreamingResponse(stream, media_type="text/event-stream")
    results = await run_to_completion(request, generations)
    completion_tokens = sum(c.generated_tokens for c in results)
    # Without best_of, choices stay in seed order (choice i is the seed + i sample, as streamed).
    chosen = results if body.best_of is None else best(results, per_prompt, body.n)
    choices = [choice_of(body, i, texts[i // body.n], c, grammar) for i, c in enumerate(chosen)]
    return CompletionResponse(
        id=new_id("cmpl"),
        created=now(),
        model=model,
        choices=choices,
        usage=CompletionUsage.of(prompt_tokens, completion_tokens, cached_tokens(results, per_prompt)),
    )


def _stream(
    body: CompletionRequest,
    model: str,
    texts: list[str],
    generations: list[Generation],
    prompt_tokens: int,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[str]:
    """Chunks carry the same tokens, texts and offsets as the non-streamed answer: the echoed
    prompt (with its logprobs) comes with a choice's first chunk, then released tokens."""
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model}
    offsets = [0 if body.echo else len(texts[i // body.n]) for i in range(len(generations))]
    started = [False] * len(generations)

    def choice(index: int, text: str, finish: str | None, logprobs: CompletionLogprobs | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs and logprobs.model_dump(), "finish_reason": finish}

    def render(index: int, event: Event, finish: str | None) -> dict | None:
        tokens = list(event.tokens)
        text = event.text
        if body.echo and not started[index]:
            text = texts[index // body.n] + text
            tokens = (event.prefill or []) + tokens
        started[index] = True
        logprobs = None
        if body.logprobs is not None and tokens:
            logprobs = completion_logprobs(tokens, offsets[index])
            offsets[index] += sum(len(t.text) for t in tokens)
        if text or finish or logprobs:
            return choice(index, text, finish, logprobs)
        return None

    return stream_choices(head, generations, [], render, prompt_tokens, include_usage, body.n, continuous_usage)
