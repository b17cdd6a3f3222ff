"""The prefix cache's structure, model-free: chained block keys, lookups, the LRU and its budget."""

import torch

from app.engine.kv_cache import KVAccount
from app.engine.prefix_cache import PrefixCache, block_keys

B = 4  # block size in these tests
LAYERS = 3


class Reader:
    """A stand-in for the batch's K/V: token t's values are all equal to ids[t]."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.calls.append((start, end))
        values = torch.tensor(self.ids[start:end], dtype=torch.float32)
        return values[None, None, None, :, None].expand(LAYERS, 2, 1, end - start, 2).clone()


def hit(pc: PrefixCache, ids: list[int]) -> list[bytes]:
    """The cached run of blocks prompt `ids` hits (and touches)."""
    return pc.match(pc.prompt_keys(ids))


def cache(max_tokens: int = 1000, account: KVAccount | None = None) -> PrefixCache:
    return PrefixCache(max_tokens, LAYERS, account, block_size=B)


def test_keys_are_chained_over_full_blocks_only() -> None:
    a = block_keys(list(range(10)), B)
    assert len(a) == 2  # 10 tokens: two full blocks, the last 2 tokens are not keyed
    b = block_keys([*range(8), 99, 98, 97, 96], B)
    assert b[:2] == a  # the same first 8 tokens: the same keys
    c = block_keys([0, 1, 2, 5, 4, 5, 6, 7], B)
    assert c[0] != a[0] and c[1] != a[1], "a change in block 0 changes every later key (chained)"
    assert block_keys([4, 5, 6, 7], B)[0] != a[1], "a block's key depends on what precedes it"


def test_match_returns_the_cached_run_and_leaves_the_last_token() -> None:
    pc = cache()
    ids = list(range(12))
    assert pc.insert(ids, Reader(ids), room=1000) == 3
    assert len(hit(pc, ids)) == 2, "12 tokens: at most 11 may come from the cache, so 2 blocks"
    assert len(hit(pc, [*ids, 50])) == 3
    assert len(hit(pc, [0, 1, 2, 3, 9, 9, 9, 9, 9])) == 1  # diverges in block 1
    assert hit(pc, [7, 1, 2, 3, 4]) == []
    blocks = pc.blocks(hit(pc, [*ids, 50]))
    got = torch.cat([b[0, 0, 0, :, 0] for b in blocks])
    assert got.tolist() == [float(t) for t in ids], "the blocks hold the K/V of their tokens, in order"


def test_insert_stores_only_missing_blocks() -> None:
    pc = cache()
    first = list(range(8))
    pc.insert(first, Reader(first), room=1000)
    reader = Reader([*first, 20, 21, 22, 23, 24])
    assert pc.insert(reader.ids, reader, room=1000) == 1
    assert reader.calls == [(8, 12)], "the shared blocks are not read again"
    assert pc.tokens == 3 * B


def test_lru_evicts_the_oldest_chain_tail_first() -> None:
    pc = cache(max_tokens=4 * B)
    a, b = [1] * 8, [2] * 8
    pc.insert(a, Reader(a), room=1000)
    pc.insert(b, Reader(b), room=1000)
    hit(pc, [*a, 0])  # a is now the most recent
    c = [3] * 4
    pc.insert(c, Reader(c), room=1000)  # one block over: b's tail goes, b's head stays
    assert len(hit(pc, [*b, 0])) == 1
    assert len(hit(pc, [*a, 0])) == 2
    assert len(hit(pc, [*c, 0])) == 1
    assert pc.tokens == 4 * B


def test_room_and_max_tokens_bound_the_cache_and_the_account() -> None:
    account = KVAccount(LAYERS)
    pc = cache(max_tokens=3 * B, account=account)
    ids = list(range(40))  # 10 blocks
    assert pc.insert(ids, Reader(ids), room=1000) == 3, "max_tokens: the first 3 blocks only"
    assert pc.tokens == 3 * B
    assert account.allocated == 3 * B  # a cached position counts as one position in every layer
    other = [7] * 8
    assert pc.insert(other, Reader(other), room=B) == 1, "room 1 block: older blocks make way, then it stops"
    assert pc.tokens == B
    assert pc.insert([9] * 8, Reader([9] * 8), room=0) == 0
    pc.evict_to(0)
    assert pc.tokens == 0 and len(pc) == 0
    assert account.allocated == 0 and account.peak == 3 * B


def test_evict_to_keeps_the_most_recent_blocks() -> None:
    pc = cache()
    for value in range(5):
        ids = [value] * B
        pc.insert(ids, Reader(ids), room=1000)
    hit(pc, [0] * B + [1])  # the oldest becomes the newest
    pc.evict_to(2 * B)
    assert [len(hit(pc, [v] * B + [0])) for v in range(5)] == [1, 0, 0, 0, 1]


def test_blocks_stop_at_the_first_evicted_one() -> None:
    pc = cache()
    ids = list(range(12))
    pc.insert(ids, Reader(ids), room=1000)
    keys = hit(pc, [*ids, 0])
    pc.evict_to(2 * B)  # the chain's tail (least recently used) goes first
    assert len(pc.blocks(keys)) == 2


def test_cached_tokens_peeks_without_touching() -> None:
    pc = cache(max_tokens=2 * B)
    a, b = [1] * B, [2] * B
    pc.insert(a, Reader(a), room=1000)
    pc.insert(b, Reader(b), room=1000)
    assert pc.cached_tokens(pc.prompt_keys([*a, 0])) == B
    assert pc.cached_tokens(pc.prompt_keys(a)) == 0, "the last token is never cached"
    pc.insert([3] * B, Reader([3] * B), room=1000)  # evicts the least recently used: still a
    assert hit(pc, [*a, 0]) == [] and len(hit(pc, [*b, 0])) == 1
