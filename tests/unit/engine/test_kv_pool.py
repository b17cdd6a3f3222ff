"""The KV pool, model-free: pages, reference counts, the free list, the budget, and page tables
that rows move by reference; paged decode attention keeps a row's bits alone and in any batch, on
the paged kernel (paged_attention.cpp) and on gathered pages (its fallback), and the two agree."""

import random

import pytest
import torch

from app.engine.kv.kv_cache import KVAccount
from app.engine.kv.kv_pool import KVPool, PagedRows, PoolExhaustedError
from app.engine.models import attention
from app.engine.models.attention import chunk_width, decode_attention, paged_decode_attention, paged_kernel

LAYERS, KV_HEADS, DIM, PAGE = 2, 2, 8, 16


def pool(max_pages: int | None = None, account: KVAccount | None = None) -> KVPool:
    return KVPool(LAYERS, KV_HEADS, DIM, torch.float32, torch.device("cpu"), max_pages, account)


def test_pages_are_counted_charged_and_reused_lowest_first() -> None:
    account = KVAccount(LAYERS)
    p = pool(max_pages=8, account=account)
    first = p.allocate(3)
    assert first == [1, 2, 3], "page 0 (zeros) is never handed out"
    assert p.used_pages == 3 and account.allocated == 3 * PAGE
    p.retain([2])
    p.release(first)
    assert p.used_pages == 1 and p.refs[2] == 1, "a page with a reference left stays"
    assert p.allocate(2) == [1, 3], "freed pages are reused, lowest id first"
    with pytest.raises(PoolExhaustedError):
        p.allocate(6)
    assert account.allocated == 3 * PAGE


def test_new_pages_are_zeroed_and_an_unbounded_pool_grows_keeping_them() -> None:
    p = pool()
    rows = PagedRows(p, [[]], [0])
    rows.grow([300 * PAGE])  # more than the first tensors hold
    assert p.reallocations == 1
    slots = rows.slots([0], [5])
    k = torch.ones(1, KV_HEADS, DIM)
    rows.write(1, slots, k, 2 * k)
    keys, values = rows.gather(1, rows.gather_index([0], 2 * PAGE), 1, 2 * PAGE)
    assert keys[0, :, 5].eq(1).all() and values[0, :, 5].eq(2).all()
    assert keys[0, :, :5].eq(0).all() and keys[0, :, 6:].eq(0).all(), "fresh pages hold zeros"


def test_rows_leave_and_join_by_page_table_without_copies() -> None:
    account = KVAccount(LAYERS)
    p = pool(max_pages=64, account=account)
    a = PagedRows(p, [[], [], []], [0, 0, 0])
    a.grow([20, 5, 40])
    b = PagedRows(p, [[]], [0])
    b.grow([17])
    tables = [list(t) for t in a.tables]
    allocations = p.allocations
    a.select([0, 2])
    assert a.tables == [tables[0], tables[2]] and p.used_pages == 2 + 3 + 2
    a.concatenate(b)
    assert b.tables == [] and len(a.tables) == 3
    assert (p.allocations, p.copies) == (allocations, 0), "leaving and joining copy no K/V"
    a.release()
    assert p.used_pages == 0 and account.allocated == 0


def test_rows_of_another_pool_are_copied_in() -> None:
    mine, theirs = pool(), pool()
    a, b = PagedRows(mine), PagedRows(theirs, [[]], [0])
    b.grow([3])
    b.write(0, b.slots([0, 0, 0], [0, 1, 2]), torch.full((3, KV_HEADS, DIM), 7.0), torch.zeros(3, KV_HEADS, DIM))
    a.concatenate(b)
    keys, _ = a.gather(0, a.gather_index([0], PAGE), 1, PAGE)
    assert keys[0, :, :3].eq(7).all() and theirs.used_pages == 0 and mine.copies == 1


def test_rollback_zeroes_positions() -> None:
    p = pool()
    rows = PagedRows(p, [[]], [0])
    rows.grow([20])
    rows.write(0, rows.slots([0] * 20, list(range(20))), torch.ones(20, KV_HEADS, DIM), torch.ones(20, KV_HEADS, DIM))
    rows.zero(0, 14, 20)
    keys, values = rows.gather(0, rows.gather_index([0], 2 * PAGE), 1, 2 * PAGE)
    assert keys[0, :, :14].eq(1).all() and keys[0, :, 14:].eq(0).all() and values[0, :, 14:].eq(0).all()


def attend_in_batch(
    p: KVPool,
    rng: random.Random,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: int,
    at: int,
    path: str = "gathered",
) -> torch.Tensor:
    """Row `at` (query q, keys k and values v [length, kv_heads, dim]) among `batch` random rows,
    its pages wherever the pool puts them: its decode attention output [heads, dim], by `path`
    ("gathered": `decode_attention` over `gather`, "kernel": `paged_decode_attention`)."""
    length, kv_heads, heads = k.shape[0], k.shape[1], q.shape[0]
    lengths = [rng.randint(1, 200) for _ in range(batch)]
    lengths[at] = length
    rows = PagedRows(p, [[] for _ in range(batch)], [0] * batch)
    p.allocate(rng.randint(0, 5))  # the row's pages land elsewhere in the pool
    rows.grow(lengths)
    for r, n in enumerate(lengths):
        keys = k if r == at else torch.randn(n, kv_heads, DIM)
        values = v if r == at else torch.randn(n, kv_heads, DIM)
        rows.write(0, rows.slots([r] * n, list(range(n))), keys, values)
    width = chunk_width(max(lengths))
    queries = torch.randn(batch, heads, DIM)
    queries[at] = q
    if path == "kernel":
        kernel = paged_kernel(p.kv[0], DIM)
        assert kernel is not None, "the paged kernel did not build here"
        tables = rows.page_table(list(range(batch)), width)
        out = paged_decode_attention(kernel, queries, p.kv[0], tables, torch.tensor(lengths), DIM**-0.5)[at]
    else:
        keys, values = rows.gather(0, rows.gather_index(list(range(batch)), width), batch, width)
        out = decode_attention(queries, keys, values, torch.tensor(lengths), DIM**-0.5, width)[at]
    rows.release()
    return out


@pytest.mark.parametrize("path", ["gathered", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2)])
def test_paged_decode_attention_is_bitwise_the_row_alone_in_any_batch(
    heads: int, kv_heads: int, dtype: torch.dtype, path: str
) -> None:
    """A row's pages anywhere in the pool, beside any rows: decode attention over the gathered pages,
    or the kernel over the pages in place, gives the bits of the row alone."""
    rng = random.Random(0)
    torch.manual_seed(0)
    checked = 0
    for _ in range(12):
        p = KVPool(1, kv_heads, DIM, dtype, torch.device("cpu"))
        length = rng.randint(1, 150)
        q, k, v = torch.randn(heads, DIM), torch.randn(length, kv_heads, DIM), torch.randn(length, kv_heads, DIM)
        alone = attend_in_batch(p, rng, q, k, v, 1, 0, path)
        for _ in range(3):
            batch = rng.randint(2, 20)
            got = attend_in_batch(p, rng, q, k, v, batch, rng.randrange(batch), path)
            assert torch.equal(got, alone), (length, batch)
            checked += 1
    assert checked == 36


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 8, 8), (12, 12, 64), (8, 2, 40), (4, 1, 128)])
def test_paged_kernel_matches_attention_over_gathered_pages(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    """The kernel's values are those of `decode_attention` (to fp32 rounding), for GQA, head sizes
    that are not a multiple of 16, a bf16 pool, and rows whose pages interleave; its writes are
    those of the gathered path."""
    torch.manual_seed(1)
    rng = random.Random(1)
    batch = 7
    lengths = [rng.randint(1, 300) for _ in range(batch)]
    p = KVPool(1, kv_heads, dim, dtype, torch.device("cpu"))
    rows = PagedRows(p, [[] for _ in range(batch)], [0] * batch)
    for step in range(0, max(lengths), 16):  # grow in turns, so the rows' pages interleave
        rows.grow([min(n, step + 16) for n in lengths])
    for r, n in enumerate(lengths):
        rows.write(0, rows.slots([r] * n, list(range(n))), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim))
    width = chunk_width(max(lengths))
    queries = torch.randn(batch, heads, dim)
    keys, values = rows.gather(0, rows.gather_index(list(range(batch)), width), batch, width)
    expected = decode_attention(queries, keys, values, torch.tensor(lengths), dim**-0.5, width)
    kernel = paged_kernel(p.kv[0], dim)
    assert kernel is not None, "the paged kernel did not build here"
    got = paged_decode_attention(
        kernel, queries, p.kv[0], rows.page_table(list(range(batch)), width), torch.tensor(lengths), dim**-0.5
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Writes: the kernel's copy and the indexed assignment put the same values in the same places.
    k, v = torch.randn(3, kv_heads, dim), torch.randn(3, kv_heads, dim)
    slots = rows.slots([0, 3, 6], [lengths[0] - 1, 0, lengths[6] - 1])
    pages, offsets = slots
    rows.write(0, slots, k, v)
    by_kernel = p.kv[0][pages, :, :, offsets].clone()  # [3, 2, kv_heads, dim]
    attention.use_paged_kernel(False)
    try:
        rows.write(0, slots, k + 1, v + 1)
        rows.write(0, slots, k, v)
    finally:
        attention.use_paged_kernel(True)
    assert torch.equal(p.kv[0][pages, :, :, offsets], by_kernel)
    assert torch.equal(by_kernel[:, 0], k.to(dtype)) and torch.equal(by_kernel[:, 1], v.to(dtype))


def test_paged_kernel_refuses_a_length_past_its_pages() -> None:
    """A length the page table cannot hold is a clear error, not a read outside the pool."""
    p = pool()
    rows = PagedRows(p, [[]], [0])
    rows.grow([10])
    kernel = paged_kernel(p.kv[0], DIM)
    assert kernel is not None
    with pytest.raises(RuntimeError, match="length past its pages"):
        paged_decode_attention(
            kernel, torch.randn(1, 2, DIM), p.kv[0], rows.page_table([0], PAGE), torch.tensor([17]), 1.0
        )
