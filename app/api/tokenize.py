"""POST /tokenize and /detokenize, for clients that budget tokens."""

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, ServiceDep
from app.api.errors import validation
from app.api.schemas import RequestModel

router = APIRouter(tags=["tokens"])


class TokenizeRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": "The list"}]})

    inputs: str = Field(description="Text to tokenize, as a prompt would be (the tokenizer's special prefix included).")
    add_special_tokens: bool = True


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(BaseModel):
    tokens: list[TokenSpan]
    count: int
    max_input_tokens: int


class DetokenizeRequest(RequestModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": [464, 1351]}]})

    tokens: list[int] = Field(description="Token ids.")
    skip_special_tokens: bool = True


class DetokenizeResponse(BaseModel):
    text: str
    count: int


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, _: EngineDep, service: ServiceDep) -> TokenizeResponse:
    """Token ids with their text and character spans in `inputs`."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    enc = await run_in_threadpool(
        tok, body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True
    )
    spans = [
        TokenSpan(id=i, text=body.inputs[a:b], start=a, stop=b)
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return TokenizeResponse(tokens=spans, count=len(spans), max_input_tokens=service.loaded.limits.max_input_tokens)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, _: EngineDep, service: ServiceDep) -> DetokenizeResponse:
    """The text of a list of token ids."""
    assert service.loaded is not None
    tok = service.loaded.tokenizer
    bad = [i for i in body.tokens if i < 0 or i >= len(tok)]
    if bad:
        raise validation(f"token ids outside the vocabulary (0..{len(tok) - 1}): {bad[:5]}", "tokens")
    text = await run_in_threadpool(tok.decode, body.tokens, skip_special_tokens=body.skip_special_tokens)
    return DetokenizeResponse(text=text, count=len(body.tokens))
