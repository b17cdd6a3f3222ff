"""OpenAI-compatible routes (/v1/*), on the same engine, limits and metrics as the TGI routes."""

from fastapi import APIRouter

from app.api.openai import chat, completions, decisions, embeddings, lora, models, responses

router = APIRouter()
for module in (models, completions, chat, responses, embeddings, lora, decisions):
    router.include_router(module.router)
