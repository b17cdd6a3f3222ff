"""The prefix cache's structure, model-free: chained block keys, lookups by reference into the KV
pool, the LRU of unreferenced pages and its budget."""

import torch

from app.engine.kv.kv_cache import KVAccount
from app.engine.kv.kv_pool import KVPool, PagedRows
from app.engine.kv.prefix_cache import PrefixCache, block_keys

B = 4  # page (block) size in these tests
LAYERS = 3


def make(max_tokens: int = 1000, max_pages: int | None = None, account: KVAccount | None = None) -> PrefixCache:
    pool = KVPool(LAYERS, 1, 2, torch.float32, torch.device("cpu"), max_pages, account, page_size=B)
    return PrefixCache(pool, max_tokens)


def prefill(pc: PrefixCache, ids: list[int], hit: list[int] | None = None) -> PagedRows:
    """A row of prompt `ids` in the pool, as the engine makes one: the pages `hit` from the cache,
    new pages for the rest, token t's keys and values all equal to ids[t]; then its full pages
    are indexed."""
    rows = PagedRows(pc.pool, [list(hit or [])], [len(hit or []) * B])
    rows.grow([len(ids)])
    start = rows.lengths[0]
    positions = list(range(start, len(ids)))
    if positions:
        values = torch.tensor(ids[start:], dtype=torch.float32)[:, None, None].expand(len(positions), 1, 2)
        slots = rows.slots([0] * len(positions), positions)
        for layer in range(LAYERS):
            rows.write(layer, slots, values, values)
    rows.lengths = [len(ids)]
    pc.insert(ids, rows.tables[0])
    return rows


def hit(pc: PrefixCache, ids: list[int]) -> list[int]:
    """The pages prompt `ids` hits (touched, one reference each given back at once)."""
    pages = pc.match(pc.prompt_keys(ids))
    pc.pool.release(pages)
    return pages


def test_keys_are_chained_over_full_blocks_only() -> None:
    a = block_keys(list(range(10)), B)
    assert len(a) == 2  # 10 tokens: two full blocks, the last 2 tokens are not keyed
    b = block_keys([*range(8), 99, 98, 97, 96], B)
    assert b[:2] == a  # the same first 8 tokens: the same keys
    c = block_keys([0, 1, 2, 5, 4, 5, 6, 7], B)
    assert c[0] != a[0] and c[1] != a[1], "a change in block 0 changes every later key (chained)"
    assert block_keys([4, 5, 6, 7], B)[0] != a[1], "a block's key depends on what precedes it"


def test_a_hit_is_a_reference_to_the_rows_pages_not_a_copy() -> None:
    pc = make()
    ids = list(range(1, 13))
    row = prefill(pc, ids)
    pool = pc.pool
    allocations, copies = pool.allocations, pool.copies
    pages = pc.match(pc.prompt_keys([*ids, 50]))
    assert pages == row.tables[0][:3], "the hit names the pages the first row wrote"
    assert [pool.refs[p] for p in pages] == [2, 2, 2], "shared: one reference each for the row and the hit"
    assert (pool.allocations, pool.copies) == (allocations, copies), "a hit allocates and copies nothing"
    other = PagedRows(pool, [pages], [3 * B])
    index = other.gather_index([0], 4 * B)
    keys, _ = other.gather(0, index, 1, 4 * B)
    assert keys[0, 0, : 3 * B, 0].tolist() == [float(t) for t in ids], "the pages hold the tokens' K/V, in order"
    assert len(hit(pc, ids)) == 2, "12 tokens: at most 11 may come from the cache, so 2 blocks"
    assert len(hit(pc, [0, 1, 2, 3, 9])) == 0 and len(hit(pc, [1, 2, 3, 4, 9, 9, 9, 9, 9])) == 1


def test_a_twin_prompt_shares_the_indexed_pages_and_frees_its_own() -> None:
    account = KVAccount(LAYERS)
    pc = make(account=account)
    ids = list(range(1, 11))  # 2 full pages and a partial one
    first = prefill(pc, ids)
    second = prefill(pc, ids)  # prefilled beside it (no hit): the same keys, its own pages at first
    assert second.tables[0][:2] == first.tables[0][:2], "the twin's full pages became the indexed ones"
    assert second.tables[0][2] != first.tables[0][2], "a partial last page is never shared"
    assert pc.pool.used_pages == 4 and account.allocated == 4 * B, "2 shared + 2 partial pages are held"


def test_unreferenced_pages_stay_cached_and_are_evicted_least_recent_first() -> None:
    pc = make()
    a, b = [1] * 8 + [0], [2] * 8 + [0]
    prefill(pc, a).release()
    prefill(pc, b).release()
    assert pc.tokens == 4 * B, "the rows left; their full pages stay, evictable"
    hit(pc, a)  # a is now the most recent
    pc.evict_to(3 * B)  # one page over: b's tail goes, b's head stays
    assert len(hit(pc, b)) == 1 and len(hit(pc, a)) == 2
    assert pc.tokens == 3 * B


def test_referenced_pages_are_never_evicted() -> None:
    pc = make()
    ids = [5] * 8 + [0]
    row = prefill(pc, ids)
    pc.clear()
    assert len(pc) == 2 and pc.tokens == 0, "both pages are referenced by the row: nothing to evict"
    row.release()
    assert pc.tokens == 2 * B
    pc.clear()
    assert len(pc) == 0 and pc.pool.used_pages == 0


def test_max_tokens_bounds_the_index() -> None:
    account = KVAccount(LAYERS)
    pc = make(max_tokens=3 * B, account=account)
    ids = list(range(41))  # 10 full pages
    prefill(pc, ids).release()
    assert len(pc) == 3, "max_tokens: the first 3 pages only"
    assert pc.pool.used_pages == 3 and account.allocated == 3 * B, "the pages not indexed were freed"
    prefill(pc, [7] * 9).release()
    assert len(pc) == 3 and len(hit(pc, [7] * 9)) == 2, "older pages made way"
    pc.evict_to(0)
    assert len(pc) == 0 and account.allocated == 0


def test_the_pool_reclaims_cached_pages_when_it_runs_short() -> None:
    pc = make(max_pages=4)
    prefill(pc, [3] * 12 + [0]).release()  # 3 cached pages, 1 free
    assert pc.pool.free_pages == 1
    rows = PagedRows(pc.pool, [[]], [0])
    rows.grow([3 * B])  # needs 3: two cached pages are evicted, least recently used first (the tail)
    assert len(pc) == 1 and len(hit(pc, [3] * 12 + [0])) == 1


def test_cached_tokens_peeks_without_touching() -> None:
    pc = make(max_tokens=2 * B)
    a, b = [1] * B + [0], [2] * B + [0]
    prefill(pc, a).release()
    prefill(pc, b).release()
    assert pc.cached_tokens(pc.prompt_keys(a)) == B
    assert pc.cached_tokens(pc.prompt_keys(a[:B])) == 0, "the last token is never cached"
    prefill(pc, [3] * B + [0]).release()  # evicts the least recently used: still a
    assert hit(pc, a) == [] and len(hit(pc, b)) == 1
