"""POST /v1/chat/completions: the tokenizer's chat template (or TEXTGEN_CHAT_TEMPLATE) renders
the messages into a prompt, then it is a completion like any other."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError, validation
from app.api.generation import ContextDep, Generation, check_refused, run_to_completion
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
from app.api.openai.logprobs import chat_logprobs
from app.api.openai.protocol import (
    ChatChoice,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionUsage,
    new_id,
    now,
)
from app.api.openai.tools import ToolCallOutput, ToolPlan, collect, end_reason, tool_plan
from app.api.structured import compile_grammar, openai_spec
from app.engine.core.constraints import Grammar
from app.engine.core.types import Completion, Event
from app.service import Service

router = APIRouter(tags=["OpenAI"])


def _content(message: ChatMessage, index: int) -> str | None:
    """A message's text. Content parts must all be text: this server runs text-only models."""
    if not isinstance(message.content, list):
        return message.content
    texts = []
    for k, part in enumerate(message.content):
        kind = part.get("type")
        if kind != "text":
            what = f"type {kind!r}" if kind is not None else "no `type`"
            raise APIError(
                400,
                f"messages[{index}].content[{k}] has {what}; this model takes text parts only (type 'text')",
                "validation",
                f"messages.{index}.content.{k}",
            )
        if not isinstance(part.get("text"), str):
            raise APIError(
                400, f"messages[{index}].content[{k}].text must be a string", "validation", f"messages.{index}.content"
            )
        texts.append(part["text"])
    return "".join(texts)


def count_messages_first(service: Service, messages: list[ChatMessage]) -> None:
    """Refuse a conversation whose texts alone are far over the cap before the template renders
    it (rendering tokenizes into Python ints, holding the GIL for seconds on megabytes); run it in
    a worker thread. Text that merges across message boundaries may lose a few tokens, hence
    twice the cap. Used by chat, /tokenize and Anthropic's routes."""
    assert service.loaded is not None
    backend = getattr(service.loaded.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    texts = []
    for m in messages:
        parts = m.content if isinstance(m.content, list) else [{"text": m.content or ""}]
        texts += [p["text"] for p in parts if isinstance(p.get("text"), str)]
    count = sum(len(e) for e in backend.encode_batch(texts, add_special_tokens=False)) if texts else 0
    limit = service.loaded.limits.max_total_tokens
    if count > 2 * limit:
        raise validation(
            f"`messages` is over {count} tokens of text alone; at most {limit} are tokenized here "
            "(TEXTGEN_MAX_TOTAL_TOKENS, the longest sequence this server runs)",
            "messages",
        )


def chat_template_of(service: Service) -> str | None:
    """TEXTGEN_CHAT_TEMPLATE, else the tokenizer's own template."""
    assert service.loaded is not None
    return service.chat_template or getattr(service.loaded.tokenizer, "chat_template", None)


def render_prompt(service: Service, body: ChatRequest) -> list[int]:
    """Token ids of the conversation rendered by the chat template. Every message field (name,
    tool_calls, tool_call_id, ...), the request's `tools` and `chat_template_kwargs` reach the
    template, as in vLLM."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    template = chat_template_of(service)
    if not template:
        raise APIError(
            400,
            "This model has no chat template, so /v1/chat/completions cannot format messages. "
            "Use /v1/completions, or start the server with TEXTGEN_CHAT_TEMPLATE=/path/to/template.jinja "
            "(a Jinja chat template).",
            "validation",
            "messages",
        )
    conversation = []
    for i, m in enumerate(body.messages):
        message = m.model_dump(exclude_none=True)
        message["content"] = _content(m, i)
        conversation.append(message)
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError(
            400,
            "`continue_final_message` needs add_generation_prompt=false",
            "validation",
            "continue_final_message",
        )
    kwargs = dict(body.chat_template_kwargs or {})
    try:
        text = tok.apply_chat_template(
            conversation,
            tools=[*body.tools] if body.tools is not None else None,  # a copy: the stub wants list[dict | Callable]
            chat_template=template,
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **kwargs,
        )
    except Exception as exc:  # a template that rejects these messages (e.g. role order)
        raise APIError(
            400, f"the chat template could not render these messages: {exc}", "validation", "messages"
        ) from exc
    # The rendered text already holds any BOS the template wants.
    return tok(text, add_special_tokens=False)["input_ids"]


@router.post(
    "/v1/chat/completions",
    response_model=ChatResponse,
    responses=SSE_RESPONSES,
)
async def chat(body: ChatRequest, request: Request, ctx: ContextDep):
    """OpenAI chat completions for models with a chat template."""
    service = ctx.service
    model = check_model(service, body.model)
    check_refused(body)
    spec, field = openai_spec(body)
    if spec is not None and body.tools and body.tool_choice != "none":
        # Checked first: the conflict is the error, whatever the chat template.
        name = field.split(".")[0]
        raise validation(
            f"`tools` and `{name}` cannot be combined: the answer would have to be a tool call and a "
            f"`{name}` document at once. Send one of them, not both (or tool_choice 'none' to show the "
            "tools to the chat template only)",
            name,
        )
    template = chat_template_of(service)
    # Checked before templating, so a bad tool is named as such (render_prompt refuses no template).
    extra_keys = service.settings.json_additional_properties
    cap = service.settings.max_tool_calls
    plan = (
        tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, template, extra_keys, cap)
        if template
        else None
    )
    if plan is not None:
        spec, field = plan.spec, "tools"
    await run_in_threadpool(count_messages_first, service, body.messages)
    ids = await run_in_threadpool(render_prompt, service, body)  # templating is slow work
    ctx.usage["prompt"] = [m.model_dump() for m in body.messages]
    grammar = await compile_grammar(ctx, spec, field)
    generations = start_choices(
        ctx,
        body,
        [ids],
        body.max_completion_tokens or body.max_tokens,
        prompt_field="messages",
        grammar=grammar,
        adapter=adapter_of(service, model),
    )
    if body.stream:
        include_usage, continuous = usage_flags(body)
        stream = _stream(body, model, generations, len(ids), include_usage, continuous, plan)
        return StreamingResponse(stream, media_type="text/event-stream")
    results = await run_to_completion(request, generations)
    choices = [_choice(body, i, c, grammar, plan) for i, c in enumerate(results)]
    completion_tokens = sum(c.generated_tokens for c in results)
    usage = CompletionUsage.of(len(ids), completion_tokens, cached_tokens(results, len(results)))
    return ChatResponse(id=new_id("chatcmpl"), created=now(), model=model, choices=choices, usage=usage)


def _choice(body: ChatRequest, index: int, c: Completion, grammar: Grammar | None, plan: ToolPlan | None) -> ChatChoice:
    end = finish_of(c, grammar)
    logprobs = chat_logprobs(c.tokens) if body.logprobs else None
    if plan is None:
        text_message: dict = {"role": "assistant", "content": c.text}
        return ChatChoice(index=index, message=text_message, logprobs=logprobs, finish_reason=end)
    out = collect(plan, c.text, end)
    message: dict = {"role": "assistant", "content": out.content}
    if out.calls:
        message["tool_calls"] = [call.openai() for call in out.calls]
    return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=out.finish)


def _stream(
    body: ChatRequest,
    model: str,
    generations: list[Generation],
    prompt_tokens: int,
    include_usage: bool,
    continuous_usage: bool,
    plan: ToolPlan | None,
) -> AsyncIterator[str]:
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model}

    def choice(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    outputs = [ToolCallOutput(plan) for _ in generations] if plan is not None else []

    def render(index: int, event: Event, finish: str | None) -> dict | None:
        logprobs = chat_logprobs(event.tokens) if body.logprobs else None
        if logprobs is not None and not logprobs["content"]:
            logprobs = None
        text = event.text
        calls: list[dict] = []
        if outputs:
            step = outputs[index].feed(event.text, end_reason(finish))
            text, calls, finish = step.text, [d.openai() for d in step.calls], step.finish
        if not (text or calls or finish or logprobs):
            return None
        delta: dict = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
        return choice(index, delta, finish, logprobs)

    first = [choice(i, {"role": "assistant", "content": ""}, None) for i in range(len(generations))]
    return stream_choices(
        head, generations, first, render, prompt_tokens, include_usage, len(generations), continuous_usage
    )
