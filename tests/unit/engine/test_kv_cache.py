"""SlabLayer: every Cache method it inherits works on its buffers or is refused, V's head size
may differ from K's, and an account sees every buffer."""

import pytest
import torch

from app.engine.kv.kv_cache import KVAccount, SlabCache, SlabLayer


def states(rows: int, length: int, dim: int, start: float = 0.0) -> torch.Tensor:
    return torch.arange(rows * 2 * length * dim, dtype=torch.float32).reshape(rows, 2, length, dim) + start


def test_values_may_have_another_head_size_than_keys() -> None:
    cache = SlabCache(account=KVAccount(1))
    k, v = states(2, 3, 8), states(2, 3, 12, 1000.0)
    cache.update(k, v, 0)
    other = SlabCache(account=cache.account)
    k2, v2 = states(3, 5, 8, 5.0), states(3, 5, 12, 2000.0)
    other.update(k2, v2, 0)
    cache.concatenate(other)  # more rows and a longer row: the buffers are reallocated
    layer = cache.layers[0]
    assert layer.keys.shape == (5, 2, 5, 8) and layer.values.shape == (5, 2, 5, 12)
    assert torch.equal(layer.values[:2, :, 2:], v) and torch.equal(layer.values[2:], v2)
    assert torch.equal(layer.keys[:2, :, 2:], k) and torch.equal(layer.keys[2:], k2)
    for _ in range(200):  # grow past the spare columns: a decode-time reallocation
        cache.update(states(5, 1, 8), states(5, 1, 12), 0)
    assert torch.equal(layer.values[:2, :, 2:5], v) and layer.values.shape == (5, 2, 205, 12)


def test_inherited_methods_are_implemented_or_refused() -> None:
    cache = SlabCache()
    cache.update(states(2, 4, 8), states(2, 4, 8), 0)
    layer = cache.layers[0]
    assert isinstance(layer, SlabLayer)
    cache.crop(-1)
    assert layer.keys.shape[2] == 3 and cache.get_seq_length() == 3
    for call in (
        lambda: cache.batch_select_indices(torch.tensor([1])),
        lambda: cache.batch_repeat_interleave(2),
        lambda: cache.reorder_cache(torch.tensor([1, 0])),
        lambda: layer.offload(),
        lambda: layer.prefetch(),
    ):
        with pytest.raises(NotImplementedError, match="not supported"):
            call()
    assert layer.keys.shape == (2, 2, 3, 8)  # untouched by the refused calls
    cache.reset()
    assert cache.get_seq_length() == 0


def test_the_account_counts_every_buffer_and_both_sides_of_a_copy() -> None:
    account = KVAccount(layers=1)
    cache = SlabCache(account=account, columns=10)
    cache.update(states(2, 4, 8), states(2, 4, 8), 0)
    assert account.allocated == 2 * 10  # exact rows, the column target
    for _ in range(7):
        cache.update(states(2, 1, 8), states(2, 1, 8), 0)  # 11 columns > 10: reallocated to 11
    assert account.allocated == 2 * 11
    assert account.peak == 2 * 10 + 2 * 11  # old and new buffers were alive together
    cache.release()
    assert account.allocated == 0
