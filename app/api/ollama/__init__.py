"""Ollama's API (/api/*), a thin conversion onto the OpenAI routes' building blocks and the same
engine: errors in Ollama's shape `{"error": "..."}` (app/api/errors.py)."""

from fastapi import APIRouter

from app.api.ollama import embed, generate, models

router = APIRouter()
for module in (models, generate, embed):
    router.include_router(module.router)
