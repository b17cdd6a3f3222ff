"""Automatic prefix caching: an index of full prompt pages in the KV pool, keyed by their token ids.

A prompt is cut into blocks of one page (`KVPool.page_size` tokens). Block i's key is a hash
chained over every token up to its end (blake2b of block i-1's key and block i's ids), so a key
names a whole prefix, and prompts that share only their first blocks (a system prompt) still hit
those. Only full pages are indexed (a row writes on into its partial last page, so that one is
never shared); a lookup covers at most the prompt's first `len - 1` tokens, because the last
prompt token is always run (its logits choose the first new token).

The cache holds no K/V of its own: a key names a page of the pool (app/engine/kv/kv_pool.py). A hit
adds a reference to each matched page and the row's page table starts with them (no copy); a store
registers a prefilled row's full prompt pages, and where a page with the same key is indexed
already (another choice of an n > 1 request, or a prompt prefilled beside its twin) the row drops
its own page and references the indexed one, so a prompt's pages are held once. An indexed page
that no row references is evictable: it stays until the pool needs a page (`KVPool.reclaim`) or
the engine makes room for live requests (`evict_to`), least recently used first. A hit touches its
chain back to front, and a store does the same, so a chain loses its tail blocks before its head
(a head alone still hits, a tail without its head never could). At most `max_tokens` positions are
indexed.

The structure is model-free (tests/unit/engine/test_prefix_cache.py).
"""

import hashlib
from array import array
from collections import OrderedDict

from app.engine.kv.kv_pool import KVPool


def block_keys(ids: list[int], block_size: int, namespace: bytes = b"") -> list[bytes]:
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
    """An LRU index {block key: page} over `pool`, of at most `max_tokens` positions. It becomes the
    pool's `reclaim` (its unreferenced pages are freed when the pool runs short)."""

    def __init__(self, pool: KVPool, max_tokens: int) -> None:
        self.pool = pool
        self.block_size = pool.page_size
        self.max_tokens = max_tokens
        self._pages: OrderedDict[bytes, int] = OrderedDict()  # oldest first
        self._keys: dict[int, bytes] = {}  # page -> its key
        pool.reclaim, pool.keep = self._reclaim, self.indexes

    def __len__(self) -> int:
        return len(self._pages)

    def indexes(self, page: int) -> bool:
        """Whether `page` is indexed (a row releasing its last reference leaves it to the cache)."""
        return page in self._keys

    @property
    def tokens(self) -> int:
        """Positions in indexed pages that no row references: what eviction can give back."""
        refs = self.pool.refs
        return sum(1 for p in self._keys if refs[p] == 0) * self.block_size

    @property
    def indexed_tokens(self) -> int:
        return len(self._pages) * self.block_size

    def prompt_keys(self, ids: list[int], namespace: bytes = b"") -> list[bytes]:
        """The keys a prompt `ids` may hit: its full blocks within the first len(ids) - 1 tokens."""
        return block_keys(ids[: len(ids) - 1], self.block_size, namespace)

    def cached_tokens(self, keys: list[bytes]) -> int:
        """Tokens the leading run of `keys` that is indexed covers (the LRU order is unchanged)."""
        run = 0
        while run < len(keys) and keys[run] in self._pages:
            run += 1
        return run * self.block_size

    def match(self, keys: list[bytes]) -> list[int]:
        """The pages of the leading run of `keys` (from `prompt_keys`) that is indexed, each with one
        more reference, which the caller owns (they start its row's page table). The run becomes
        the most recently used, its first block last."""
        found = keys[: self.cached_tokens(keys) // self.block_size]
        pages = [self._pages[k] for k in found]
        self.pool.retain(pages)
        self._touch(found)
        return pages

    def insert(self, ids: list[int], table: list[int], namespace: bytes = b"") -> int:
        """Index the full blocks of prompt `ids`, whose K/V are in the pages `table` (a row's page
        table, which it changes: where a block is indexed already under another page, the row
        references that page and its own is released). Older unreferenced pages are evicted to stay
        within `max_tokens`; a block that still does not fit is not indexed, nor the ones after it.
        Returns the blocks newly indexed."""
        keys = block_keys(ids, self.block_size, namespace)
        stored = 0
        chain: list[bytes] = []
        for i, key in enumerate(keys):
            page = self._pages.get(key)
            if page is None:
                if not self._make_room(self.max_tokens - self.block_size, keep=set(chain)):
                    break
                self._pages[key] = table[i]
                self._keys[table[i]] = key
                stored += 1
            elif page != table[i]:  # the same prefix in another page: share the indexed one
                self.pool.retain([page])
                self.pool.release([table[i]])
                table[i] = page
            chain.append(key)
        self._touch(chain)
        return stored

    def evict_to(self, tokens: int) -> None:
        """Evict least recently used unreferenced pages until at most `tokens` positions are
        evictable (`tokens`)."""
        excess = self.tokens - max(tokens, 0)
        if excess > 0:
            self._evict(-(-excess // self.block_size), keep=set())

    def clear(self) -> None:
        """Evict every unreferenced page (pages rows still reference stay indexed)."""
        self.evict_to(0)

    def _reclaim(self, pages: int) -> int:
        return self._evict(pages, keep=set())

    def _make_room(self, tokens: int, keep: set[bytes]) -> bool:
        """Evict LRU unreferenced pages not in `keep` until at most `tokens` positions are indexed;
        False if it cannot."""
        if tokens < 0:
            return False
        excess = self.indexed_tokens - tokens
        if excess <= 0:
            return True
        need = -(-excess // self.block_size)
        return self._evict(need, keep) >= need

    def _evict(self, pages: int, keep: set[bytes]) -> int:
        """Free up to `pages` unreferenced indexed pages not in `keep`, least recently used first."""
        refs = self.pool.refs
        victims = [k for k, p in self._pages.items() if refs[p] == 0 and k not in keep][:pages]
        for key in victims:
            page = self._pages.pop(key)
            del self._keys[page]
            self.pool.free(page)
        return len(victims)

    def _touch(self, chain: list[bytes]) -> None:
        for key in reversed(chain):
            self._pages.move_to_end(key)
