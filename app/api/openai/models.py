"""GET /v1/models and /v1/models/{id}."""

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.errors import APIError
from app.api.openai.protocol import ModelCard, ModelList, OpenAIErrorBody
from app.service import Service

router = APIRouter(tags=["OpenAI"])


def cards(service: Service) -> list[ModelCard]:
    ids = [service.model_name]
    if service.settings.embedding_model:
        ids.append(service.settings.embedding_model)
    out = [ModelCard(id=i, created=service.started, root=i) for i in ids]
    if service.engine is not None:  # LoRA adapters, as vLLM lists them: `parent` is the base
        registry = service.engine.adapters
        for name in registry.names():
            adapter = registry.get(name)
            if adapter is not None:
                out.append(ModelCard(id=name, created=service.started, root=adapter.path, parent=service.model_name))
    return out


@router.get("/v1/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    """The served model: its `id` is what requests must send as `model`."""
    return ModelList(data=cards(service))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": OpenAIErrorBody}})
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    for card in cards(service):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist.", "model_not_found", "model")
