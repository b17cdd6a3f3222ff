"""One rendering of a token in context, used everywhere a token's text appears.

The rule (README, "Token texts"):
- A token's text is what it adds to the decoded text when it is appended to everything before
  it. Each step decodes a short window of the preceding ids and keeps what the new id added, so
  SentencePiece keeps the space of `▁word` and byte-level BPE keeps `Ġ` as a space.
- A token that ends inside a multi-byte UTF-8 character adds "": the token that completes the
  character carries all of it (the text decoded so far ends in U+FFFD until then). Its own UTF-8
  bytes are still reported (`Piece.raw`), so concatenating the bytes of every token gives the text.
- Special tokens (those `skip_special_tokens=True` removes) add "" to the returned text.

So `"".join(texts)` is the text, and each text offset is the sum of the lengths before it.
A candidate (a top logprob) is rendered as if it had been chosen at that position (`peek`).
Functions here are plain and synchronous: callers may run them in a worker thread.
"""

import json
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_WINDOW = 6  # complete ids of context decoded before the new one
_MAX_PENDING = 4  # a UTF-8 character has at most 4 bytes: longer runs are invalid bytes, not pending
_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class Piece:
    """A token rendered at one position. `text` is what it adds to the returned text; `raw` is
    its own UTF-8 bytes there (a part of a character for an incomplete token, b"" for a special
    token); `complete` is False while the token ends inside a multi-byte character."""

    text: str
    raw: bytes
    complete: bool
    special: bool


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table (byte-level BPE token strings)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class _TokenizerInfo:
    """What rendering needs to know about a tokenizer, computed once per tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        self.skipped = frozenset(special)
        self.added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        decoder = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.decoder is not None:
            decoder = json.dumps(json.loads(backend.decoder.__getstate__()))  # the decoder's own JSON
        self.byte_level = '"ByteLevel"' in decoder
        self.byte_fallback = '"ByteFallback"' in decoder
        self.byte_decoder = _byte_decoder() if self.byte_level else {}
        self.starts: dict[int, bool] = {}


_INFO: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, _TokenizerInfo]" = weakref.WeakKeyDictionary()


def tokenizer_info(tokenizer: PreTrainedTokenizerBase) -> _TokenizerInfo:
    info = _INFO.get(tokenizer)
    if info is None:
        info = _INFO[tokenizer] = _TokenizerInfo(tokenizer)
    return info


def skipped_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that `skip_special_tokens=True` removes from decoded text."""
    return tokenizer_info(tokenizer).skipped


def special_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A special token's own text (`<|im_end|>`), as stop strings are matched against it."""
    info = tokenizer_info(tokenizer)
    if token_id in info.added:
        return info.added[token_id]
    return str(tokenizer.convert_ids_to_tokens(token_id))


def raw_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes | None:
    """A token's own bytes where the vocabulary says them (byte-level BPE, `<0xNN>` byte
    fallback pieces); None where only decoding in context can tell."""
    info = tokenizer_info(tokenizer)
    if token_id in info.added:
        return info.added[token_id].encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return None
    if info.byte_level:
        try:
            return bytes(info.byte_decoder[c] for c in piece)
        except KeyError:
            return None
    if info.byte_fallback:
        match = _BYTE_PIECE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
    return None


def _starts_character(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """False for a token whose bytes begin inside a character (a UTF-8 continuation byte):
    decoding must not start there, or byte decoders turn the whole run into U+FFFD."""
    starts = tokenizer_info(tokenizer).starts
    if token_id not in starts:
        raw = raw_bytes(tokenizer, token_id)
        starts[token_id] = not raw or not 0x80 <= raw[0] < 0xC0
    return starts[token_id]


class TokenRenderer:
    """Renders the ids of one sequence as they come (prompt, then generated), in context."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skipped = skipped_ids(tokenizer)
        # Non-special ids: up to _WINDOW complete ones (ids[:read]) then the pending ones.
        self.ids: list[int] = [i for i in context if i not in self.skipped][-(_WINDOW + _MAX_PENDING) :]
        while self.ids and not _starts_character(tokenizer, self.ids[0]):
            self.ids.pop(0)
        self.read = len(self.ids)
        self.pending_bytes = b""
        self._prefix: tuple[object, str] = (None, "")
        # A context that ends inside a character leaves its last ids pending.
        while (
            self.read > 0
            and len(self.ids) - self.read < _MAX_PENDING
            and self._decode(self.ids[: self.read]).endswith(_REPLACEMENT)
        ):
            self.read -= 1
        for i in self.ids[self.read :]:
            self.pending_bytes += raw_bytes(tokenizer, i) or b""

    def _decode(self, ids: list[int]) -> str:
        # One sequence of ids decodes to one str (the stub also allows a batch's list[str]).
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return cast(str, text)

    def _window_start(self, start: int) -> int:
        start = max(0, start)
        while start > 0 and not _starts_character(self.tokenizer, self.ids[start]):
            start -= 1
        return start

    def peek(self, token_id: int, final: bool = False) -> Piece:
        """`token_id` rendered as if appended now; with `final`, an incomplete character is
        rendered as it decodes (U+FFFD) because nothing will follow."""
        if token_id in self.skipped:
            return Piece("", b"", True, True)
        start = self._window_start(self.read - _WINDOW)
        key = (start, self.read, tuple(self.ids[start : self.read]))
        if self._prefix[0] != key:  # candidates at one position share the decoded context
            self._prefix = (key, self._decode(self.ids[start : self.read]))
        prefix = self._prefix[1]
        full = self._decode([*self.ids[start:], token_id])
        pending = len(self.ids) - self.read + 1
        if not final and full.endswith(_REPLACEMENT) and pending < _MAX_PENDING:
            return Piece("", raw_bytes(self.tokenizer, token_id) or b"", False, False)
        if full.startswith(prefix):
            text = full[len(prefix) :]
        else:  # a decoder that rewrites earlier text: keep what differs
            common = 0
            while common < min(len(prefix), len(full)) and prefix[common] == full[common]:
                common += 1
            text = full[common:]
        encoded = text.encode()
        raw = encoded[len(self.pending_bytes) :] if encoded.startswith(self.pending_bytes) else encoded
        return Piece(text, raw, True, False)

    def add(self, token_id: int, final: bool = False) -> Piece:
        """Append `token_id` and return its rendering."""
        piece = self.peek(token_id, final)
        if piece.special:
            return piece
        self.ids.append(token_id)
        if piece.complete:
            self.ids = self.ids[self._window_start(len(self.ids) - _WINDOW) :]
            self.read = len(self.ids)
            self.pending_bytes = b""
        else:
            self.pending_bytes += piece.raw
        return piece


def render(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[Piece]:
    """Every id of `ids` rendered in context from the start (a prompt, for echo)."""
    renderer = TokenRenderer(tokenizer)
    return [renderer.add(i) for i in ids]


def render_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The text that the rendered tokens of `ids` tile: what echo returns for a prompt."""
    return "".join(p.text for p in render(tokenizer, ids))
