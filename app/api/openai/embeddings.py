"""POST /v1/embeddings, served by the same batched embedder as /embed."""

import base64

import numpy as np
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, ServiceDep
from app.api.embed import check_batch, embed_ids, tokenize_inputs
from app.api.errors import validation
from app.api.openai.common import check_model
from app.api.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, OpenAIErrorBody, Usage
from app.service import Service

router = APIRouter(tags=["OpenAI"])


def _token_inputs(service: Service, items: list[list[int]]) -> list[list[int]]:
    embedder = service.embedder
    assert embedder is not None  # check_model(embedding=True) refused the request otherwise
    vocab = len(embedder.tokenizer)
    for i, ids in enumerate(items):
        if max(ids) >= vocab:
            raise validation(f"input {i}: token id {max(ids)} is outside the vocabulary ({vocab})", "input")
        if len(ids) > embedder.max_tokens:
            raise validation(f"`input` {i} has {len(ids)} tokens; the model's limit is {embedder.max_tokens}", "input")
    return items


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses={code: {"model": OpenAIErrorBody} for code in (400, 404, 429, 503)},
)
async def embeddings(body: EmbeddingRequest, engine: EngineDep, service: ServiceDep) -> EmbeddingResponse:
    """OpenAI embeddings: text or token-id inputs; float or base64 (little-endian float32)."""
    model = check_model(service, body.model, embedding=True)
    assert service.embedder is not None
    if body.dimensions is not None and body.dimensions != service.embedder.dimensions:
        raise validation(
            f"`dimensions` is not supported: this model's embeddings have {service.embedder.dimensions} "
            "dimensions; omit the field or pass exactly that",
            "dimensions",
        )
    raw = body.input
    if isinstance(raw, str):
        ids = await run_in_threadpool(tokenize_inputs, service, [raw], truncate=False, openai=True)
    elif raw and isinstance(raw[0], int):
        ids = _token_inputs(service, [raw])
    elif raw and isinstance(raw[0], str):
        check_batch(service, len(raw), openai=True)
        ids = await run_in_threadpool(tokenize_inputs, service, list(raw), truncate=False, openai=True)
    else:
        check_batch(service, len(raw), openai=True)
        ids = _token_inputs(service, list(raw))  # type: ignore[arg-type]  # raw[0] is a list: lists of token ids
    vectors = await embed_ids(engine, ids, normalize=service.embedder.normalize_default)
    data = []
    for i, vector in enumerate(vectors):
        value: list[float] | str = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append(EmbeddingData(index=i, embedding=value))
    tokens = sum(len(x) for x in ids)
    return EmbeddingResponse(data=data, model=model, usage=Usage.of(tokens))
