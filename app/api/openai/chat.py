"""POST /v1/chat/completions: the tokenizer's chat template (or TEXTGEN_CHAT_TEMPLATE) renders
the messages into a prompt, then it is a completion like any other."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError
from app.api.generation import ContextDep, Generation, check_refused, run_to_completion
from app.api.openai.common import FINISH, SSE_RESPONSES, check_model, start_choices, stream_choices
from app.api.openai.logprobs import chat_logprobs
from app.api.openai.protocol import (
    ChatChoice,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    Usage,
    new_id,
    now,
)
from app.api.structured import compile_grammar, openai_spec
from app.engine.types import Event
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


def render_prompt(service: Service, body: ChatRequest) -> list[int]:
    """Token ids of the conversation rendered by the chat template. Every message field (name,
    tool_calls, tool_call_id, ...), the request's `tools` and `chat_template_kwargs` reach the
    template, as in vLLM."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    template = service.chat_template or getattr(tok, "chat_template", None)
    if not template:
        raise APIError(
            400,
            "This model has no chat template, so /v1/chat/completions cannot format messages. "
            "Use /v1/completions, or start the server with TEXTGEN_CHAT_TEMPLATE=/path/to/template.jinja "
            "(a Jinja chat template).",
            "validation",
            "messages",
        )
    if body.tools and body.tool_choice is None:
        raise APIError(
            400,
            "tool calls are not supported by this server (they would not be parsed): send tool_choice 'none' "
            "to show `tools` to the chat template only, or omit `tools`",
            "validation",
            "tool_choice",
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
            tools=body.tools,
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
    ids = await run_in_threadpool(render_prompt, service, body)  # templating is slow work
    ctx.usage["prompt"] = [m.model_dump() for m in body.messages]
    top = (body.top_logprobs or 0) if body.logprobs else 0
    grammar = await compile_grammar(ctx, *openai_spec(body))
    generations = start_choices(
        ctx,
        body,
        [ids],
        body.max_completion_tokens or body.max_tokens,
        top_logprobs=top,
        prompt_field="messages",
        grammar=grammar,
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(body, model, generations, len(ids), include_usage), media_type="text/event-stream"
        )
    results = await run_to_completion(request, generations)
    choices = [
        ChatChoice(
            index=i,
            message={"role": "assistant", "content": c.text},
            logprobs=chat_logprobs(c.tokens) if body.logprobs else None,
            finish_reason=FINISH[c.finish_reason],
        )
        for i, c in enumerate(results)
    ]
    completion_tokens = sum(c.generated_tokens for c in results)
    usage = Usage.of(len(ids), completion_tokens)
    return ChatResponse(id=new_id("chatcmpl"), created=now(), model=model, choices=choices, usage=usage)


def _stream(
    body: ChatRequest, model: str, generations: list[Generation], prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": model}

    def choice(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def render(index: int, event: Event, finish: str | None) -> dict | None:
        logprobs = chat_logprobs(event.tokens) if body.logprobs else None
        if logprobs is not None and not logprobs["content"]:
            logprobs = None
        if event.text or finish or logprobs:
            return choice(index, {"content": event.text} if event.text else {}, finish, logprobs)
        return None

    first = [choice(i, {"role": "assistant", "content": ""}, None) for i in range(len(generations))]
    return stream_choices(head, generations, first, render, prompt_tokens, include_usage)
