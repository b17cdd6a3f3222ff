"""Tool output on /api/chat, in Ollama's shape: calls read by chat's `ToolCallOutput` (so every
family agrees on what is a call), `arguments` as objects."""

import json

from app.api.ollama.convert import DONE_REASON
from app.api.openai.tools import ToolPlan, collect
from app.engine.core.types import Completion, Token


def tool_calls(plan: ToolPlan, text: str) -> list[dict] | None:
    """The tool calls in a complete output, in Ollama's shape (`arguments` an object), or None for
    free text."""
    out = collect(plan, text, "stop")
    if out.finish != "tool_calls":
        return None
    return [
        {"id": c.id, "function": {"index": k, "name": c.name, "arguments": json.loads(c.arguments)}}
        for k, c in enumerate(out.calls)
    ]


class ToolOutput:
    """Reads output for /api/chat, streamed or whole: the one place tool output is handled, so it
    can move onto a shared handler. Without tools, text passes as it comes. With tools, output that
    may be a call (it starts with the call's tag) is held until the end, then sent as calls when it
    parses and the model stopped by itself, else as text; other text streams at once."""

    def __init__(self, plan: ToolPlan | None) -> None:
        self.plan = plan
        self.held: str | None = "" if plan is not None else None
        self.held_tokens: list[Token] = []

    def feed(
        self, text: str, tokens: list[Token], completion: Completion | None
    ) -> tuple[str, list[dict] | None, list[Token]] | None:
        """(text, calls, tokens) to send now, or None while holding."""
        if self.held == "" and text[:1] not in ("", "<"):
            self.held = None  # free text: a call would start with its tag
        if self.held is None:
            return text, None, tokens
        self.held += text
        self.held_tokens += tokens
        if completion is None:
            return None
        assert self.plan is not None
        stopped = DONE_REASON[completion.finish_reason] == "stop"
        calls = tool_calls(self.plan, self.held) if stopped else None
        return ("" if calls else self.held), calls, self.held_tokens
