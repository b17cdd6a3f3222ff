"""Automatic prefix caching: the K/V of recent prompts, in blocks keyed by their token ids.

A prompt is cut into blocks of `block_size` tokens. Block i's key is a hash chained over every
token up to its end (blake2b of block i-1's key and block i's ids), so a key names a whole prefix,
and prompts that share only their first blocks (a system prompt) still hit those. Only full
blocks are stored; a lookup covers at most the prompt's first `len - 1` tokens, because the last
prompt token is always run (its logits choose the first new token).

Blocks live in an LRU within `max_tokens`. Every block is charged to the engine's KV account (the
budget TEXTGEN_MAX_BATCH_TOKENS counts cached blocks too), and the engine evicts blocks whenever
live requests need the room (`evict_to`): the cache only ever holds what the budget leaves free.
Eviction takes the least recently used block first; a hit touches its chain back to front, and an
insert does the same, so a chain loses its tail blocks before its head (a head alone still hits,
a tail without its head never could).

A block's tensor is [layers, 2 (keys, values), kv_heads, block_size, head_dim], opaque here: the
structure is model-free (tests/unit/engine/test_prefix_cache.py).
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable

import torch

from app.engine.row_cache import Account

BLOCK_SIZE = 16


def block_keys(ids: list[int], block_size: int = BLOCK_SIZE, namespace: bytes = b"") -> list[bytes]:
    """The chained key of every full block of `ids` (len(ids) // block_size keys).

    Key i hashes key i-1 and the ids of block i, so equal keys mean equal prefixes (up to a
    128-bit hash collision). `namespace` seeds the chain: K/V computed with other weights (a LoRA
    adapter) must never match the base model's blocks for the same ids."""
    keys: list[bytes] = []
    parent = hashlib.blake2b(namespace, digest_size=16).digest() if namespace else b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        data = array("q", ids[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + data, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """An LRU of K/V blocks within `max_tokens` cached positions, charged to `account` (slots =
    tokens x `layers`, as the account counts a position in every layer)."""

    def __init__(
        self, max_tokens: int, layers: int, account: Account | None = None, block_size: int = BLOCK_SIZE
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {block_size}")
        self.max_tokens = max_tokens
        self.layers = layers
        self.account = account
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._blocks)

    def __del__(self) -> None:
        self.clear()

    @property
    def tokens(self) -> int:
        """Cached token positions (blocks x block_size)."""
        return len(self._blocks) * self.block_size

    def prompt_keys(self, ids: list[int], namespace: bytes = b"") -> list[bytes]:
        """The keys a prompt `ids` may hit: its full blocks within the first len(ids) - 1 tokens."""
        return block_keys(ids[: len(ids) - 1], self.block_size, namespace)

    def cached_tokens(self, keys: list[bytes]) -> int:
        """Tokens the leading run of `keys` that is cached covers (the LRU order is unchanged)."""
        run = 0
        while run < len(keys) and keys[run] in self._blocks:
            run += 1
        return run * self.block_size

    def match(self, keys: list[bytes]) -> list[bytes]:
        """The leading run of `keys` (from `prompt_keys`) that is cached. The run becomes the
        most recently used, its first block last."""
        found = keys[: self.cached_tokens(keys) // self.block_size]
        self._touch(found)
        return found

    def blocks(self, keys: list[bytes]) -> list[torch.Tensor]:
        """The tensors of `keys`' leading run that is still cached (eviction may have cut it)."""
        out: list[torch.Tensor] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def insert(
        self, ids: list[int], read: Callable[[int, int], torch.Tensor], room: int, namespace: bytes = b""
    ) -> int:
        """Store the full blocks of `ids` not cached yet. `read(start, end)` gives the K/V of
        tokens [start, end) as a new tensor (not a view: each block must free its memory alone).
        Older blocks are evicted to fit within min(max_tokens, `room`); blocks that still do not
        fit are not stored. Returns the blocks stored."""
        limit = min(self.max_tokens, room)
        keys = block_keys(ids, self.block_size, namespace)
        stored = 0
        chain: list[bytes] = []
        for i, key in enumerate(keys):
            if key not in self._blocks:
                present = set(chain)
                if not self._make_room(limit - self.block_size, keep=present):
                    break
                start = i * self.block_size
                block = read(start, start + self.block_size)
                self._charge()
                self._blocks[key] = block
                stored += 1
            chain.append(key)
        self._touch(chain)
        return stored

    def evict_to(self, tokens: int) -> None:
        """Evict least recently used blocks until at most `tokens` positions are cached."""
        self._make_room(tokens, keep=set())

    def clear(self) -> None:
        self.evict_to(0)

    def _make_room(self, tokens: int, keep: set[bytes]) -> bool:
        """Evict LRU blocks not in `keep` until at most `tokens` are cached; False if it cannot."""
        if tokens < 0:
            return False
        if self.tokens <= tokens:
            return True
        victims = iter([k for k in self._blocks if k not in keep])
        while self.tokens > tokens:
            key = next(victims, None)
            if key is None:
                return False
            del self._blocks[key]
            self._release()
        return True

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):
            self._blocks.move_to_end(key)

    def _charge(self) -> None:
        if self.account is not None:
            self.account.charge(self.block_size * self.layers)

    def _release(self) -> None:
        if self.account is not None:
            self.account.release(self.block_size * self.layers)
