"""POST /tokenize, POST /detokenize and GET /tokenizer_info, for clients that budget tokens.

Two dialects share the routes, told apart by their fields:
- TGI's (textgen's first): `/tokenize` {"inputs"} -> {"tokens": [{"id", "text", "start", "stop"}],
  "count", "max_input_tokens"}.
- vLLM's (what lm-evaluation-harness probes): `/tokenize` {"prompt"} or {"messages"} ->
  {"tokens": [ids], "count", "max_model_len", "token_strs"}; `/detokenize` {"tokens"} ->
  {"prompt"}; `/tokenizer_info` -> the tokenizer's config (eos_token, bos_token, chat_template, ...).
`/detokenize` answers both at once: {"text", "count"} (TGI) and {"prompt"} (vLLM).

Encoding, decoding and building the response run in a worker thread, and a text is at most
`max_total_tokens` tokens (the context, as vLLM caps it), so no request stalls the event loop or
answers with a response the size of a book.
"""

import contextlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, ServiceDep
from app.api.errors import mark_vllm, validation
from app.api.generation import check_refused
from app.api.openai.chat import chat_template_of, count_messages_first, render_prompt
from app.api.openai.common import check_model
from app.api.openai.protocol import ChatMessage, ChatRequest
from app.api.schemas import Refused, RequestModel
from app.service import Service

router = APIRouter(tags=["tokens"])


class TokenizeRequest(RequestModel):
    """Exactly one of `inputs` (TGI), `prompt` or `messages` (vLLM)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"inputs": "The list"}, {"prompt": "The list", "add_special_tokens": False}]}
    )

    inputs: str | None = Field(None, description="TGI: text to tokenize, as a prompt would be.")
    prompt: str | None = Field(None, description="vLLM: text to tokenize.")
    messages: list[ChatMessage] | None = Field(None, description="vLLM: a conversation, rendered by the chat template.")
    model: str | None = Field(None, description="vLLM: if given, a served model id (GET /v1/models).")
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (BOS); default true for text, false for messages."
    )
    return_token_strs: bool = Field(False, description="vLLM: also return each token's vocabulary string.")
    add_generation_prompt: bool = Field(True, description="vLLM, with messages: end with the assistant header.")
    continue_final_message: bool = Field(False, description="vLLM, with messages: leave the last message open.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM, with messages: template variables.")
    tools: list[dict] | None = Field(None, description="vLLM, with messages: tools the template renders.")
    # vLLM fields textgen does not serve: a request-level template (as on chat), multimodal inputs.
    chat_template: Annotated[Any, Refused()] = None
    mm_processor_kwargs: Annotated[Any, Refused()] = None


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(BaseModel):
    """TGI's shape (the request sent `inputs`)."""

    tokens: list[TokenSpan]
    count: int
    max_input_tokens: int


class VLLMTokenizeResponse(BaseModel):
    """vLLM's shape (the request sent `prompt` or `messages`)."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": [464, 1351]}]})

    tokens: list[int] = Field(description="Token ids.")
    skip_special_tokens: bool = Field(True, description="For `text`: false keeps special tokens' text.")
    model: str | None = Field(None, description="vLLM: if given, a served model id.")


class DetokenizeResponse(BaseModel):
    text: str = Field(description="TGI: the text, special tokens skipped unless skip_special_tokens is false.")
    count: int
    prompt: str = Field(description="vLLM: the text with special tokens kept, as vLLM decodes.")


def _json(payload: dict) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")


def _check_length(service: Service, count: int, field: str) -> None:
    assert service.loaded is not None
    limit = service.loaded.limits.max_total_tokens
    if count > limit:
        raise validation(
            f"`{field}` is {count} tokens; at most {limit} are tokenized here (TEXTGEN_MAX_TOTAL_TOKENS, "
            "the longest sequence this server runs)",
            field,
        )


def _count_first(service: Service, text: str, add_special_tokens: bool, field: str) -> None:
    """Refuse a text over the cap from the Rust tokenizer's count alone: it releases the GIL while
    encoding, whereas turning a million ids (and offsets) into Python objects would hold it for
    seconds and stall every other request."""
    assert service.loaded is not None
    backend = getattr(service.loaded.tokenizer, "backend_tokenizer", None)
    if backend is not None:
        _check_length(service, len(backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]), field)


def _tgi(service: Service, text: str, add_special_tokens: bool) -> str:
    """TGI's response as JSON text (run in a worker thread)."""
    assert service.loaded is not None
    _count_first(service, text, add_special_tokens, "inputs")
    enc = service.loaded.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    _check_length(service, len(enc["input_ids"]), "inputs")
    spans = [
        {"id": i, "text": text[a:b], "start": a, "stop": b}
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    body = {"tokens": spans, "count": len(spans), "max_input_tokens": service.loaded.limits.max_input_tokens}
    return json.dumps(body, ensure_ascii=False)


def _vllm(service: Service, body: TokenizeRequest) -> str:
    """vLLM's response as JSON text (run in a worker thread)."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    if body.messages is not None:
        count_messages_first(service, body.messages)
        chat = ChatRequest(
            model=service.model_name,
            messages=body.messages,
            tools=body.tools,
            chat_template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        )
        ids = render_prompt(service, chat)  # the template writes its own BOS
        if body.add_special_tokens:  # on top of the template's, as vLLM does
            ids = tok("", add_special_tokens=True)["input_ids"] + ids
        field = "messages"
    else:
        assert body.prompt is not None
        add = True if body.add_special_tokens is None else body.add_special_tokens
        _count_first(service, body.prompt, add, "prompt")
        ids = tok(body.prompt, add_special_tokens=add)["input_ids"]
        field = "prompt"
    _check_length(service, len(ids), field)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": service.loaded.limits.max_total_tokens, "tokens": ids}
    out["token_strs"] = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return json.dumps(out, ensure_ascii=False)


async def _dialect(request: Request) -> None:
    """A `/tokenize` body with `prompt` or `messages` and no `inputs` is vLLM's: its errors (from
    validation, the model check or a 503 while loading alike) come in vLLM's shape. Run before
    everything else the route depends on; the body is parsed once (Starlette keeps it)."""
    with contextlib.suppress(ValueError):  # not JSON: validation answers it, in TGI's shape
        body = await request.json()
        if isinstance(body, dict) and "inputs" not in body and ("prompt" in body or "messages" in body):
            mark_vllm(request)


@router.post(
    "/tokenize",
    dependencies=[Depends(_dialect)],
    response_model=None,
    responses={200: {"model": TokenizeResponse | VLLMTokenizeResponse, "description": "TGI's or vLLM's shape"}},
)
async def tokenize(body: TokenizeRequest, _: EngineDep, service: ServiceDep) -> Response:
    """TGI (`inputs`): token ids with their text and character spans. vLLM (`prompt` or
    `messages`): the ids, their count and the context length."""
    check_refused(body)
    given = [name for name in ("inputs", "prompt", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise validation(
            "send exactly one of `inputs` (TGI), `prompt` or `messages` (vLLM)"
            + (f"; got {', '.join(given)}" if given else ""),
            given[1] if len(given) > 1 else "inputs",
        )
    if body.model is not None:
        check_model(service, body.model)
    if body.inputs is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        return Response(await run_in_threadpool(_tgi, service, body.inputs, add), media_type="application/json")
    if body.messages is not None and not chat_template_of(service):
        raise validation(
            "this model has no chat template, so `messages` cannot be rendered: send `prompt`, or start the "
            "server with TEXTGEN_CHAT_TEMPLATE=/path/to/template.jinja",
            "messages",
        )
    if body.continue_final_message and body.add_generation_prompt:
        raise validation("`continue_final_message` needs add_generation_prompt=false", "continue_final_message")
    return Response(await run_in_threadpool(_vllm, service, body), media_type="application/json")


def _detokenize(service: Service, body: DetokenizeRequest) -> DetokenizeResponse:
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    text = tok.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)
    prompt = text if not body.skip_special_tokens else tok.decode(body.tokens, skip_special_tokens=False)
    return DetokenizeResponse(text=text, count=len(body.tokens), prompt=prompt)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, _: EngineDep, service: ServiceDep) -> DetokenizeResponse:
    """The text of a list of token ids, in TGI's (`text`, `count`) and vLLM's (`prompt`) fields."""
    assert service.loaded is not None
    if body.model is not None:
        check_model(service, body.model)
    tok = service.loaded.tokenizer
    _check_length(service, len(body.tokens), "tokens")
    bad = [i for i in body.tokens if i < 0 or i >= len(tok)]
    if bad:
        raise validation(f"token ids outside the vocabulary (0..{len(tok) - 1}): {bad[:5]}", "tokens")
    return await run_in_threadpool(_detokenize, service, body)


def _plain(value: Any) -> Any:
    """JSON-able config values: AddedToken -> its text (as vLLM does), dicts and lists deeply."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


# Local file paths: the server's filesystem is nobody's business.
_PATHS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")


@router.get("/tokenizer_info")
async def tokenizer_info(_: EngineDep, service: ServiceDep) -> Response:
    """vLLM's tokenizer info: the tokenizer's config (tokenizer_config.json's fields: eos_token,
    bos_token, pad_token, added_tokens_decoder, ...), `tokenizer_class`, `model_max_length` (the
    served max_total_tokens, as /tokenize's `max_model_len`), and the `chat_template` chat uses
    (TEXTGEN_CHAT_TEMPLATE or the tokenizer's), when there is one."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    config = {k: _plain(v) for k, v in (getattr(tok, "init_kwargs", None) or {}).items() if k not in _PATHS}
    config["tokenizer_class"] = type(tok).__name__
    # The served context, as /tokenize's `max_model_len` says (vLLM reports its engine's too), not the
    # tokenizer file's own bound (1024 for GPT-2's tokenizer, whatever this server runs).
    config["model_max_length"] = service.loaded.limits.max_total_tokens
    template = chat_template_of(service)
    if template:
        config["chat_template"] = template
    return _json(config)
