"""Pieces shared by the OpenAI routes: model check, sampling mapping, fan-out of n choices."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Literal

from app.api.errors import OPENAI_TYPES, APIError, validation
from app.api.generation import (
    Context,
    Generation,
    check_refused,
    check_stop,
    resolve_max_new_tokens,
    sse_json,
)
from app.api.openai.protocol import CompletionUsage, OpenAIErrorBody, SamplingFields
from app.api.structured import document_cut
from app.engine.core.constraints import Grammar
from app.engine.core.types import Completion, Event
from app.service import Service

FINISH: dict[str, Literal["stop", "length"]] = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
ERRORS: dict[int | str, dict] = {code: {"model": OpenAIErrorBody} for code in (400, 404, 429, 503, 504)}
SSE_RESPONSES: dict[int | str, dict] = {
    **ERRORS,
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"},
}

# Renders one engine event as a streamed choice (or None to send nothing).
ChoiceRenderer = Callable[[int, Event, str | None], dict | None]


def finish_of(completion: Completion, grammar: Grammar | None) -> Literal["stop", "length"]:
    """OpenAI's finish reason for an engine completion: "length" also for a stop string that cut
    constrained output (app/api/structured.document_cut). Neither OpenAI nor vLLM has a reason of
    its own for that (both say "stop", which would tell the client the JSON is finished);
    "length" is the one every client already treats as "cut short"."""
    return "length" if document_cut(completion, grammar) else FINISH[completion.finish_reason]


def check_model(service: Service, name: str, *, embedding: bool = False) -> str:
    """`name` when it is served (the base model, a loaded LoRA adapter, or for embeddings the
    embedding model); else a 404 model_not_found."""
    served = {service.model_name}
    if embedding and service.settings.embedding_model:
        served.add(service.settings.embedding_model)
    if not embedding and service.engine is not None:
        served.update(service.engine.adapters.names())
    if name not in served:
        raise APIError(
            404,
            f"The model `{name}` does not exist. Served: {', '.join(sorted(served))} (see GET /v1/models).",
            "model_not_found",
            "model",
        )
    return name


def adapter_of(service: Service, model: str) -> str | None:
    """The LoRA adapter a checked `model` names, or None for the base model."""
    return None if model == service.model_name else model


def start_choices(
    ctx: Context,
    body: SamplingFields,
    prompts: list[list[int]],
    max_tokens: int | None,
    *,
    top_logprobs: int | None = None,
    prefill_details: bool = False,
    per_prompt: int | None = None,
    prompt_field: str = "prompt",
    default_max_tokens: int | None = None,
    grammar: Grammar | None = None,
    adapter: str | None = None,
) -> list[Generation]:
    """`per_prompt` (default n) generations per prompt, in OpenAI's choice order. All or none
    are submitted. `top_logprobs`: candidates per token, when `body` does not say it itself
    (None: `body.asked_top_logprobs()`)."""
    service = ctx.service
    count = per_prompt or body.n
    limit = service.settings.max_best_of
    if count > limit:
        field = "n" if count == body.n else "best_of"
        raise validation(f"`{field}` is {count}; at most {limit} choices are allowed (TEXTGEN_MAX_BEST_OF)", field)
    assert service.loaded is not None
    check_refused(body)
    if body.stream_options is not None and not body.stream:
        # As vLLM and OpenAI: the options would be silently meaningless.
        raise validation("`stream_options` is only allowed with `stream: true`", "stream_options")
    stop = check_stop(service, body.stop_list())
    if any(not s for s in stop):
        raise validation("`stop` strings must not be empty", "stop")
    vocab = len(service.loaded.tokenizer)
    stop_ids = tuple(body.stop_token_ids or ())
    bad = [i for i in stop_ids if i >= vocab]
    if bad:
        raise validation(f"`stop_token_ids` {bad[:5]} are outside the vocabulary ({vocab})", "stop_token_ids")
    # Every choice's settings before any is submitted: a 400 leaves nothing running.
    samplings = [body.to_sampling_params(vocab, choice, top_logprobs) for choice in range(count)]
    plans = []
    for ids in prompts:
        max_new = resolve_max_new_tokens(
            service.loaded.limits,
            len(ids),
            max_tokens,
            default_max_tokens or service.settings.max_new_tokens_default,
            "max_tokens",
            prompt_field,
        )
        if body.min_tokens > max_new:
            raise validation(f"`min_tokens` ({body.min_tokens}) must be <= `max_tokens` ({max_new})", "min_tokens")
        plans.append((ids, body.to_stopping_params(max_new, stop)))
    generations: list[Generation] = []
    try:
        for ids, stopping in plans:
            for sampling in samplings:
                generations.append(Generation(ctx, ids, sampling, stopping, prefill_details, grammar, adapter))
    except APIError:
        for g in generations:
            g.cancel()
        raise
    return generations


async def merged(generations: list[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """Events of all generations as they come, tagged with the generation's index."""
    queue: asyncio.Queue[tuple[int, Event] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(index: int, g: Generation) -> None:
        try:
            async for event in g.events():
                await queue.put((index, event))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            index, payload = item
            if isinstance(payload, BaseException):
                raise payload
            yield index, payload
    finally:
        for t in tasks:
            t.cancel()
        for g in generations:
            g.cancel()


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: APIError) -> str:
    kind = OPENAI_TYPES.get(exc.error_type, exc.error_type)
    return sse_json({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": None}})


def cached_tokens(completions: list[Completion], per_prompt: int) -> int:
    """Prompt tokens served from the prefix cache, counting each prompt once (as prompt_tokens
    does): its first choice's, since `completions` are `per_prompt` choices per prompt."""
    return sum(c.cached_tokens for c in completions[::per_prompt])


def usage_flags(body: SamplingFields) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage in every chunk): `stream_options.include_usage` and, as
    in vLLM, `continuous_usage_stats` only together with it."""
    options = body.stream_options
    include = bool(options and options.include_usage)
    return include, include and bool(options and options.continuous_usage_stats)


async def stream_choices(
    head: dict,
    generations: list[Generation],
    first: list[dict],
    render: ChoiceRenderer,
    prompt_tokens: int,
    include_usage: bool,
    per_prompt: int = 1,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """OpenAI's streaming shape: `first` chunks, one chunk per rendered event, an optional usage
    chunk, then `data: [DONE]`; an error mid-stream is sent as an error event before it.
    `generations` are `per_prompt` choices per prompt, prompt after prompt. With
    `continuous_usage` every chunk also carries `usage` as vLLM sends it: its choice's prompt
    tokens and the tokens that choice has generated so far."""
    completion_tokens = 0
    cached_tokens = 0
    generated = [0] * len(generations)

    def chunk(index: int, choice: dict) -> str:
        if not continuous_usage:
            return sse_json({**head, "choices": [choice]})
        prompt = len(generations[index].request.prompt_ids)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": generated[index],
            "total_tokens": prompt + generated[index],
        }
        return sse_json({**head, "choices": [choice], "usage": usage})

    try:
        for first_choice in first:
            yield chunk(first_choice["index"], first_choice)
        async for index, event in merged(generations):
            finish = None
            if event.token is not None:
                generated[index] += 1
            if event.completion is not None:
                finish = finish_of(event.completion, generations[index].request.grammar)
                completion_tokens += event.completion.generated_tokens
                generated[index] = event.completion.generated_tokens
                if index % per_prompt == 0:
                    cached_tokens += event.completion.cached_tokens
            choice = render(index, event, finish)
            if choice is not None:
                yield chunk(index, choice)
        if include_usage:
            usage = CompletionUsage.of(prompt_tokens, completion_tokens, cached_tokens)
            yield sse_json({**head, "choices": [], "usage": usage.model_dump()})
    except APIError as exc:
        yield sse_error(exc)
    yield SSE_DONE
