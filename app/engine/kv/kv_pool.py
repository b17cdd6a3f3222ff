"""The compact forwards' KV cache: one pool of fixed-size pages, shared by rows and the prefix cache.

Every layer's keys and values live in one tensor per layer, `KVPool.kv[layer]`
[pages, 2 (keys, values), kv_heads, PAGE_SIZE, head_dim]. A row (`PagedRows`) holds a page table:
its token p lives in page `table[p // PAGE_SIZE]` at offset `p % PAGE_SIZE`. Pages carry reference
counts, so n > 1 choices and the prefix cache (app/engine/kv/prefix_cache.py, an index of full prompt
pages) share a prompt's pages instead of copying them: a cache hit or a shared prompt is a
reference, never a K/V copy. A row writes only into pages past its prompt's full ones (its partial
last page and new pages are its own), so shared pages are never written: no copy-on-write is
needed.

Memory: the budget is a number of pages (TEXTGEN_MAX_BATCH_TOKENS / PAGE_SIZE, plus one partial
page per row). The tensors start small and double up to it when pages run out (copying only the
pages ever handed out, one layer at a time); they are `torch.empty`, so on CPU the kernel backs a
page only once it is written, and the free list hands out the lowest page ids first: the resident
size follows the pages in use at the peak, not the capacity. Each page handed out is charged to the
optional account (PAGE_SIZE x layers slots) until it is freed. Page 0 is all zeros and never
handed out: attention reads it where a row has no page (past its length, masked).

Attention reads pages through `PagedRows.gather`: one `index_select` per layer copies the rows'
pages into the layout [rows, 2, kv_heads, width, head_dim] that `decode_attention` and the
prefill's chunked attention read (a transient read of one layer, freed at once, not a second
cache), so the reductions keep the shapes that batch invariance relies on (app/engine/models/attention.py).
"""

import heapq
from collections.abc import Callable
from typing import Protocol

import torch

from app.engine.models.attention import CHUNK, paged_kernel

PAGE_SIZE = 16  # tokens per page: one prefill attention chunk; CHUNK (64) is 4 pages
_FIRST_PAGES = 256  # the tensors start this large and double (up to the budget) when they run out
assert CHUNK % PAGE_SIZE == 0, "decode attention reads whole pages per chunk"


def page_width(length: int) -> int:
    """`length` rounded up to whole pages."""
    return -(-length // PAGE_SIZE) * PAGE_SIZE


class PoolExhaustedError(torch.OutOfMemoryError):
    """No free page is left and nothing unreferenced can be evicted (the engine's out-of-memory
    path handles it like device memory running out)."""


class Account(Protocol):
    """What the pool charges (`app.engine.kv.kv_cache.KVAccount` satisfies it)."""

    def charge(self, slots: int) -> None: ...
    def release(self, slots: int) -> None: ...


class KVPool:
    """Fixed-size pages for every layer, counted in pages, with reference counts and a free list.

    `max_pages`: the budget (pages handed out at once, page 0 excluded); None grows without
    bound (standalone use: the tensors double when they run out, counted in `reallocations`).
    `reclaim(n)`: called when the free list is empty, to free up to `n` unreferenced cached pages
    (the prefix cache's eviction); returns how many it freed. `keep(page)`: a page whose last
    reference goes is not freed but left to the prefix cache (it indexes the page)."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_pages: int | None = None,
        account: Account | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim, self.page_size = layers, kv_heads, head_dim, page_size
        self.dtype, self.device = dtype, device
        self.max_pages = max_pages
        self.account = account
        self.reclaim: Callable[[int], int] | None = None
        self.keep: Callable[[int], bool] | None = None  # the prefix cache's "is this page indexed?"
        capacity = min(max_pages, _FIRST_PAGES) if max_pages is not None else _FIRST_PAGES
        capacity += 1  # page 0
        self.kv = [self._empty(capacity) for _ in range(layers)]
        self.refs = [0] * capacity  # page 0 (zeros) is never handed out
        self._free = list(range(1, capacity))  # a heap: lowest ids first keeps the resident set dense
        self._high = 1  # pages at or past this id were never handed out (their memory is untouched)
        # Counters the tests read: pages handed out, K/V copied between pages or into new tensors
        # (growth), and pool reallocations.
        self.allocations = 0
        self.copies = 0
        self.reallocations = 0
        # Where `PagedRows.gather` puts one layer's keys and values: reused by every layer and step
        # (a fresh tensor each time was mapped afresh by malloc: tens of MiB of page faults a step).
        self._scratch = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]

    def _empty(self, capacity: int) -> torch.Tensor:
        t = torch.empty(
            (capacity, 2, self.kv_heads, self.page_size, self.head_dim), dtype=self.dtype, device=self.device
        )
        t[0].zero_()
        return t

    @property
    def capacity(self) -> int:
        """Pages the tensors hold, page 0 excluded."""
        return len(self.refs) - 1

    @property
    def used_pages(self) -> int:
        """Pages handed out and not freed (referenced or held by the prefix cache)."""
        return self.capacity - len(self._free)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` pages with one reference each, zeroed where never used before (so every page
        attention reads holds finite values). Evicts unreferenced cached pages, or grows an
        unbounded pool, when the free list runs short; raises PoolExhaustedError otherwise."""
        if n <= 0:
            return []
        if len(self._free) < n and self.reclaim is not None:
            self.reclaim(n - len(self._free))
        short = n - len(self._free)
        if short > 0:
            limit = self.max_pages if self.max_pages is not None else self.capacity + short + self.capacity
            if self.capacity + short > limit:
                raise PoolExhaustedError(f"the KV pool has {len(self._free)} free pages, {n} are needed")
            self._grow(min(limit, max(2 * self.capacity, self.capacity + short)))
        pages = [heapq.heappop(self._free) for _ in range(n)]
        fresh = [p for p in pages if p >= self._high]
        if fresh:
            self._high = max(self._high, max(fresh) + 1)
            index = torch.tensor(fresh, device=self.device)
            for kv in self.kv:
                kv.index_fill_(0, index, 0)
        for p in pages:
            self.refs[p] = 1
        self.allocations += n
        if self.account is not None:
            self.account.charge(n * self.page_size * self.layers)
        return pages

    def retain(self, pages: list[int]) -> None:
        """One more reference on each of `pages`."""
        for p in pages:
            self.refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """One reference less on each of `pages`; a page left with none is freed, unless the prefix
        cache indexes it (`keep`): it becomes evictable instead."""
        keep = self.keep
        freed = 0
        for p in pages:
            self.refs[p] -= 1
            assert self.refs[p] >= 0, f"page {p} released more often than retained"
            if self.refs[p] == 0 and (keep is None or not keep(p)):
                heapq.heappush(self._free, p)
                freed += 1
        if freed and self.account is not None:
            self.account.release(freed * self.page_size * self.layers)

    def free(self, page: int) -> None:
        """Free an unreferenced page the prefix cache held (its eviction)."""
        assert self.refs[page] == 0, f"page {page} is still referenced"
        heapq.heappush(self._free, page)
        if self.account is not None:
            self.account.release(self.page_size * self.layers)

    def scratch(self, which: int, numel: int) -> torch.Tensor:
        """Flat buffer `which` (0: keys, 1: values) of at least `numel` elements, reused: what it
        holds is valid only until the next call."""
        if self._scratch[which].numel() < numel:
            self._scratch[which] = torch.empty(numel + numel // 4, dtype=self.dtype, device=self.device)
        return self._scratch[which][:numel]

    def _grow(self, capacity: int) -> None:
        """Larger tensors, one layer at a time; the pages ever handed out are copied (the rest was
        never touched, so copying it would only make it resident)."""
        old = self.capacity + 1
        for layer, kv in enumerate(self.kv):
            new = self._empty(capacity + 1)
            new[: self._high] = kv[: self._high]
            self.kv[layer] = new
        self.copies += self._high - 1
        self.reallocations += 1
        self.refs += [0] * (capacity + 1 - old)
        for p in range(old, capacity + 1):
            heapq.heappush(self._free, p)


class PagedRows:
    """The rows of one batch in a `KVPool`: each row's page table and length (cached tokens).

    Rows join (`concatenate`) and leave (`select`) by moving page tables, never K/V."""

    def __init__(self, pool: KVPool, tables: list[list[int]] | None = None, lengths: list[int] | None = None) -> None:
        self.pool = pool
        self.tables: list[list[int]] = tables if tables is not None else []
        self.lengths: list[int] = lengths if lengths is not None else [0] * len(self.tables)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def rows(self) -> int:
        return len(self.tables)

    @property
    def allocated_tokens(self) -> int:
        """Token positions of the pages the rows reference (shared pages counted per row)."""
        return sum(len(t) for t in self.tables) * self.pool.page_size

    def grow(self, lengths: list[int]) -> None:
        """Give each row r pages for `lengths[r]` tokens (new pages are its own)."""
        size = self.pool.page_size
        need = [max(0, -(-n // size) - len(t)) for n, t in zip(lengths, self.tables, strict=True)]
        pages = self.pool.allocate(sum(need))
        start = 0
        for table, n in zip(self.tables, need, strict=True):
            table += pages[start : start + n]
            start += n

    def slots(self, rows: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (page, offset) of each (row, position) pair, as two long tensors: where `write`
        puts token `positions[i]` of row `rows[i]` (its page must exist: `grow` first)."""
        size = self.pool.page_size
        pages = [self.tables[r][p // size] for r, p in zip(rows, positions, strict=True)]
        offsets = [p % size for p in positions]
        device = self.device
        return torch.tensor(pages, dtype=torch.long, device=device), torch.tensor(
            offsets, dtype=torch.long, device=device
        )

    def write(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values k, v [N, kv_heads, head_dim] of N tokens at `slots` in `layer`."""
        pages, offsets = slots
        kv = self.pool.kv[layer]
        kernel = paged_kernel(kv, self.pool.head_dim)
        if kernel is not None:  # one C++ loop of copies instead of ~5 ops (attention.py says why)
            kernel.paged_write(kv, k.to(kv.dtype), v.to(kv.dtype), pages, offsets)
            return
        # Advanced indices [2, 1] x [N] around a slice: the indexed shape is [2, N, kv_heads, head_dim].
        kv[pages, torch.arange(2, device=kv.device)[:, None], :, offsets] = _pair(k, v, kv)

    def page_table(self, rows: list[int], width: int) -> torch.Tensor:
        """`rows`' page tables as a [len(rows), width / page_size] long tensor (missing pages: 0,
        the zero page), as `paged_decode_attention` reads them; width: a multiple of the page size."""
        count = width // self.pool.page_size
        table = [(self.tables[r] + [0] * count)[:count] for r in rows]
        return torch.tensor(table, dtype=torch.long, device=self.device)

    def gather_index(self, rows: list[int], width: int) -> torch.Tensor:
        """The index `gather` reads `rows`' first `width` positions with (width: a multiple of the
        page size; a row's missing pages read page 0, zeros)."""
        pool = self.pool
        pages = self.page_table(rows, width)  # [B, P]
        # Into the layer viewed as [pages * 2 * kv_heads, page_size * head_dim]: the keys of head h
        # of page p are entry (2p) * kv_heads + h, its values kv_heads entries later. Ordered
        # [B, kv_heads, P], so the pages of a head follow each other.
        heads = torch.arange(pool.kv_heads, device=self.device)
        return (pages[:, None, :] * (2 * pool.kv_heads) + heads[None, :, None]).reshape(-1)

    def gather(self, layer: int, index: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values of `rows` rows (as `gather_index` named them), each
        [rows, kv_heads, width, head_dim] and contiguous, in the pool's scratch buffers: valid until
        the next gather. (Separate tensors, not one [rows, 2, ...]: decode attention's GEMMs gave a
        row other bits alone than batched when keys and values were interleaved views of one
        tensor; measured, torch 2.13 CPU.)"""
        pool = self.pool
        flat = pool.kv[layer].view(-1, pool.page_size * pool.head_dim)
        shape = (rows, pool.kv_heads, width, pool.head_dim)
        numel = rows * pool.kv_heads * width * pool.head_dim
        keys = pool.scratch(0, numel).view(-1, flat.shape[1])
        values = pool.scratch(1, numel).view(-1, flat.shape[1])
        torch.index_select(flat, 0, index, out=keys)
        torch.index_select(flat, 0, index + pool.kv_heads, out=values)
        return keys.view(shape), values.view(shape)

    def zero(self, row: int, start: int, end: int) -> None:
        """Zero row `row`'s positions [start, end) in every layer (speculative decoding's rollback;
        they are past its prompt, so in pages it owns)."""
        if start >= end:
            return
        positions = list(range(start, end))
        slots = self.slots([row] * len(positions), positions)
        pool = self.pool
        zeros = torch.zeros((len(positions), pool.kv_heads, pool.head_dim), dtype=pool.dtype, device=pool.device)
        for layer in range(pool.layers):
            self.write(layer, slots, zeros, zeros)

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (ascending); the others' pages lose their reference."""
        kept = set(keep)
        for r, table in enumerate(self.tables):
            if r not in kept:
                self.pool.release(table)
        self.tables = [self.tables[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]

    def concatenate(self, other: "PagedRows") -> None:
        """Append `other`'s rows after ours (their references move here; `other` is left empty).
        Rows of another pool (standalone batches each make their own) are copied into ours."""
        if other.pool is not self.pool:
            other.tables = [self._copy_in(other.pool, table) for table in other.tables]
        self.tables += other.tables
        self.lengths = self.lengths + other.lengths
        other.tables, other.lengths = [], []

    def _copy_in(self, source: KVPool, table: list[int]) -> list[int]:
        """Pages of our pool holding a copy of `table`'s pages of `source` (whose references go)."""
        pages = self.pool.allocate(len(table))
        if table:
            src = torch.tensor(table, device=self.device)
            dst = torch.tensor(pages, device=self.device)
            for mine, theirs in zip(self.pool.kv, source.kv, strict=True):
                mine[dst] = theirs[src]
            self.pool.copies += len(table)
        source.release(table)
        return pages

    def release(self) -> None:
        """Every row's pages lose their reference; no row is left."""
        self.select([])

    def __del__(self) -> None:
        if self.tables:
            self.release()


def _pair(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """[2, N, kv_heads, head_dim] in the pool's dtype: the values `write` puts at its index."""
    return torch.stack([k, v]).to(kv.dtype)
