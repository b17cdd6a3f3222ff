"""POST /api/embed (and the older /api/embeddings), served by the same batched embedder as /embed
and /v1/embeddings. Vectors are L2-normalised, as Ollama returns them from /api/embed."""

import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineDep, ServiceDep
from app.api.embed import check_batch, embed_ids, tokenize_inputs
from app.api.errors import validation
from app.api.ollama.convert import keep_alive_seconds, resolve_model
from app.api.ollama.protocol import EmbeddingsRequest, EmbedRequest, Options
from app.service import Service

router = APIRouter(tags=["Ollama"])


def _check(service: Service, model: str, options: Options | None, keep_alive: float | str | None) -> str:
    name = resolve_model(service, model, embedding=True)
    keep_alive_seconds(keep_alive)
    if options is not None and options.model_dump(exclude_none=True):
        key = next(iter(options.model_dump(exclude_none=True)))
        raise validation(f"`options.{key}` does not apply to embeddings on this server; omit `options`", "options")
    return name


@router.post("/api/embed")
async def embed(body: EmbedRequest, engine: EngineDep, service: ServiceDep) -> dict:
    """One vector per input (a string or a list of strings). Inputs over the model's limit are
    cut with `truncate` (Ollama's default, true), refused with a 400 naming `input` otherwise."""
    started = time.perf_counter()
    model = _check(service, body.model, body.options, body.keep_alive)
    embedder = service.embedder
    assert embedder is not None
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise validation(
            f"`dimensions` must be this model's own, {embedder.dimensions}: textgen does not shorten vectors",
            "dimensions",
        )
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        return {"model": model, "embeddings": []}
    check_batch(service, len(texts), openai=True)
    # openai=True: a too-long input is a 400 naming `input` (TEI's own answer is a 413).
    ids = await run_in_threadpool(tokenize_inputs, service, texts, body.truncate, not body.truncate)
    vectors = await embed_ids(engine, ids, normalize=True)
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": sum(len(i) for i in ids),
    }


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsRequest, engine: EngineDep, service: ServiceDep) -> dict:
    """The older single-prompt route: `{"embedding": [...]}`, not normalised (as Ollama's)."""
    _check(service, body.model, body.options, body.keep_alive)
    if not body.prompt:
        return {"embedding": []}
    ids = await run_in_threadpool(tokenize_inputs, service, [body.prompt], True)
    (vector,) = await embed_ids(engine, ids, normalize=False)
    return {"embedding": vector}
