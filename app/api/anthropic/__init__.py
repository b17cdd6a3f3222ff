"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`): a thin module that turns
a Messages request into the internal chat request (app/api/openai/protocol.ChatRequest) and the
chat route's building blocks' results back into Anthropic's shapes."""

from app.api.anthropic.messages import router

__all__ = ["router"]
