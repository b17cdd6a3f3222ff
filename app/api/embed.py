"""TEI route: POST /embed, one vector per input, batched by the engine with generation."""

import asyncio

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, ServiceDep
from app.api.errors import APIError, from_engine, validation
from app.api.schemas import EmbedRequest, ErrorBody
from app.engine.core.types import EmbedRequest as EngineEmbedRequest
from app.engine.core.types import EngineError
from app.engine.engine import Engine
from app.service import Service

router = APIRouter(tags=["embeddings (TEI)"])


def tokenize_inputs(service: Service, texts: list[str], truncate: bool, openai: bool = False) -> list[list[int]]:
    """Token ids per input; too-long inputs are cut when `truncate`, else rejected: 413 (TEI),
    or 400 naming `input` on the OpenAI route (`openai`)."""
    assert service.embedder is not None
    limit = service.embedder.max_tokens
    out = []
    for i, text in enumerate(texts):
        ids = service.embedder.tokenize(text)
        if len(ids) > limit:
            if openai:
                raise validation(f"`input` {i} has {len(ids)} tokens; the model's limit is {limit}", "input")
            if not truncate:
                raise APIError(
                    413,
                    f"input {i} has {len(ids)} tokens; the limit is {limit}. Send shorter text or set truncate=true",
                    "validation",
                    "inputs",
                )
            ids = ids[:limit]
        if not ids:
            raise APIError(422, f"input {i} tokenized to zero tokens", "validation", "inputs")
        out.append(ids)
    return out


def check_batch(service: Service, count: int, openai: bool = False) -> None:
    limit = service.settings.max_embed_batch
    if count > limit and openai:
        raise validation(f"`input` has {count} items; at most {limit} are allowed (TEXTGEN_MAX_EMBED_BATCH)", "input")
    if count > limit:
        raise APIError(
            413, f"batch size {count} > maximum allowed batch size {limit} (TEXTGEN_MAX_EMBED_BATCH)", "validation"
        )


async def embed_ids(engine: Engine, ids: list[list[int]], normalize: bool) -> list[list[float]]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[list[float]]] = loop.create_future()

    def done(result: list[list[float]] | BaseException) -> None:
        def settle() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        loop.call_soon_threadsafe(settle)

    try:
        engine.embed(EngineEmbedRequest(ids, normalize, done))
    except EngineError as exc:
        raise from_engine(exc) from exc
    try:
        return await future
    except EngineError as exc:
        raise from_engine(exc) from exc
    except Exception as exc:
        raise APIError(500, f"embedding failed: {exc}", "embedding") from exc


@router.post(
    "/embed",
    response_model=list[list[float]],
    responses={
        413: {"model": ErrorBody, "description": "Input or batch too large"},
        422: {"model": ErrorBody, "description": "Invalid input"},
        429: {"model": ErrorBody, "description": "Queue full"},
    },
)
async def embed(body: EmbedRequest, engine: EngineDep, service: ServiceDep) -> list[list[float]]:
    """Embed one text or a list of texts (TEI's shape): pooled last hidden states, L2-normalised
    unless `normalize` is false."""
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    check_batch(service, len(texts))
    ids = await run_in_threadpool(tokenize_inputs, service, texts, body.truncate)  # off the event loop
    return await embed_ids(engine, ids, body.normalize)
