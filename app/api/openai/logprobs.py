"""OpenAI logprobs from rendered tokens (app/engine/core/detokenize.py): completion-style
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and chat-style (`content` entries
with `bytes`). Token texts join to the returned text, so offsets are running sums.
"""

import math

from app.api.openai.protocol import CompletionLogprobs
from app.engine.core.types import Token


def _logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


def _keys(t: Token) -> list[str]:
    """Dictionary keys to try for a candidate, in order: its text as if chosen, then forms that
    tell apart candidates with the same text (a part of a character, special tokens)."""
    keys = [t.text]
    if t.raw and t.raw.decode(errors="replace") != t.text:
        keys.append("bytes:" + "".join(f"\\x{b:02x}" for b in t.raw))
    keys.append(f"token_id:{t.id}")
    return keys


def top_dict(t: Token) -> dict[str, float] | None:
    """The chosen token plus its candidates as OpenAI's {text: logprob}, most likely first.
    The chosen token keeps its own text as key; candidates never overwrite each other."""
    if math.isnan(t.logprob):
        return None  # the prompt's first token: nothing predicted it
    entries: list[tuple[str, float]] = []
    used: set[str] = set()
    for cand in [t, *(c for c in t.top or [] if c.id != t.id)]:
        key = next((k for k in _keys(cand) if k not in used), f"token_id:{cand.id}")
        used.add(key)
        entries.append((key, cand.logprob))
    entries.sort(key=lambda e: -e[1])
    return dict(entries)


def completion_logprobs(tokens: list[Token], start_offset: int) -> CompletionLogprobs:
    """`text_offset[i]` is where token i starts in the choice's text (prompt included when
    echoed): `start_offset` plus the lengths of the tokens before it."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(_logprob(t.logprob))
        out.top_logprobs.append(top_dict(t))
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def chat_logprobs(tokens: list[Token]) -> dict:
    """Chat `logprobs.content`: one entry per token in `content` (special tokens such as EOS are
    not in it, so they are left out); `bytes` are the token's own UTF-8 bytes, so a character
    split across tokens has its bytes spread over their entries."""

    def entry(t: Token) -> dict:
        return {"token": t.text, "logprob": max(t.logprob, -9999.0), "bytes": list(t.raw)}

    return {
        "content": [
            {**entry(t), "top_logprobs": [entry(c) for c in t.top or []]} for t in tokens if not t.special or t.text
        ]
    }
