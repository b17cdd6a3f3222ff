"""The batch and cache invariants, checked after every step when `Engine(check_invariants=True)`
(each runner's `check()` calls its batch's function).

A violation raises AssertionError naming the rule; the tests run the engine this way so a
scheduler or cache change that breaks one fails there, not as a silently wrong token.
"""

import torch

from app.engine.runner.batch import Batch
from app.engine.runner.compact_batch import CompactBatch


def check_keep(keep: list[int], rows: int) -> None:
    """Rows kept by a filter are strictly ascending and exist (the cache moves rows forward)."""
    assert all(0 <= r < rows for r in keep), f"keep {keep} names rows outside 0..{rows - 1}"
    assert all(a < b for a, b in zip(keep, keep[1:], strict=False)), f"keep {keep} is not strictly ascending"


def check_sampling(batch: Batch | CompactBatch) -> None:
    """The batch's sampling state holds its rows' settings, in its rows' order."""
    params = [s.request.sampling for s in batch.seqs]
    assert batch.sampling.params == params, "the batch's sampling state does not follow its rows"


def check_slab_batch(batch: Batch) -> None:
    """The transformers forward's left-padded batch over a `SlabCache`."""
    check_sampling(batch)
    rows = len(batch.seqs)
    assert batch.mask.shape[0] == rows, f"mask has {batch.mask.shape[0]} rows, the batch {rows}"
    assert batch.positions.shape == (rows,), f"positions {tuple(batch.positions.shape)} for {rows} rows"
    assert batch.next_ids.shape == (rows,), f"next_ids {tuple(batch.next_ids.shape)} for {rows} rows"
    width = batch.mask.shape[1]
    for index, layer in enumerate(batch.cache.slabs):
        for name, states in (("keys", layer.keys), ("values", layer.values)):
            assert states is not None, f"layer {index} has no {name}"
            assert states.shape[0] == rows, f"layer {index} {name} has {states.shape[0]} rows, the batch {rows}"
            assert states.shape[2] == width, f"layer {index} {name} are {states.shape[2]} wide, the mask {width}"
    real = batch.mask.sum(dim=1)
    # Right-aligned and contiguous: each row is zeros then ones, so it equals its own sorted self.
    expected = torch.arange(width, device=batch.mask.device)[None, :] >= (width - real)[:, None]
    assert torch.equal(batch.mask.bool(), expected), "a row's real tokens are not right-aligned and contiguous"
    assert bool((real > 0).all()), "a row has no real token"
    assert torch.equal(batch.positions, real.to(batch.positions.dtype)), (
        f"positions {batch.positions.tolist()} do not count real tokens {real.tolist()}"
    )
    assert bool(batch.mask[:, 0].any()), "the first column is padding in every row (it should have been cut)"


def check_compact_batch(batch: CompactBatch) -> None:
    """The compact forward's rows in the KV pool: no padding, so each row holds exactly its own
    tokens, in pages it references."""
    check_sampling(batch)
    rows = len(batch.seqs)
    cache = batch.cache
    pool = cache.pool
    assert cache.rows == rows, f"the cache has {cache.rows} rows, the batch {rows}"
    assert len(cache.lengths) == rows, f"the cache has {len(cache.lengths)} lengths for {rows} rows"
    assert batch.next_ids.shape == (rows,), f"next_ids {tuple(batch.next_ids.shape)} for {rows} rows"
    for row, (seq, length, table) in enumerate(zip(batch.seqs, cache.lengths, cache.tables, strict=True)):
        # The newest token is in next_ids, not yet in the cache.
        expected = seq.prompt_len + len(seq.generated) - 1
        assert length == expected, f"row {row} caches {length} tokens, its sequence has {expected}"
        assert len(table) * pool.page_size >= length, f"row {row} caches {length} tokens in {len(table)} pages"
        assert all(pool.refs[p] > 0 for p in table), f"row {row} references a freed page"
        assert 0 not in table, f"row {row} references the zero page"
