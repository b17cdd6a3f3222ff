"""Decode attention: each row's bits are those of the row alone, whatever the batch around it."""

import random

import pytest
import torch
import torch.nn.functional as F

from app.engine.models.attention import CHUNK, chunk_width, decode_attention


def _row_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, columns: int) -> torch.Tensor:
    keys = torch.zeros((1, k.shape[0], columns, k.shape[2]))
    values = torch.zeros_like(keys)
    keys[0, :, :length], values[0, :, :length] = k, v
    return decode_attention(q[None], keys, values, torch.tensor([length]), q.shape[-1] ** -0.5, chunk_width(length))[0]


@pytest.mark.parametrize(("heads", "kv_heads"), [(12, 12), (8, 2)])
def test_rows_are_bitwise_the_same_alone_and_in_any_batch(heads: int, kv_heads: int) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    dim, checked = 32, 0
    for _ in range(25):
        length = rng.randint(1, 200)
        q, k, v = torch.randn(heads, dim), torch.randn(kv_heads, length, dim), torch.randn(kv_heads, length, dim)
        # Alone, the cache is as wide as the row's reservation (rounded up to whole chunks, as
        # the KV pool gathers a row), in a batch as wide as the longest reservation there.
        alone = _row_alone(q, k, v, length, columns=chunk_width(length) + CHUNK * rng.randint(0, 2))
        for _ in range(3):
            batch, pos = rng.randint(2, 33), 0
            pos = rng.randrange(batch)
            columns = chunk_width(length) + CHUNK * rng.randint(0, 6)
            keys, values = torch.randn(batch, kv_heads, columns, dim), torch.randn(batch, kv_heads, columns, dim)
            lengths = [rng.randint(1, columns) for _ in range(batch)]
            queries = torch.randn(batch, heads, dim)
            queries[pos], keys[pos, :, :length], values[pos, :, :length], lengths[pos] = q, k, v, length
            width = chunk_width(max(lengths))
            out = decode_attention(queries, keys, values, torch.tensor(lengths), dim**-0.5, width)
            assert torch.equal(out[pos], alone), (length, batch, columns)
            checked += 1
    assert checked == 75


def test_values_match_sdpa() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 192, 16), torch.randn(3, 2, 192, 16)
    lengths = torch.tensor([1, 77, 150])
    out = decode_attention(q, k, v, lengths, 0.25, chunk_width(150))
    for row, length in enumerate(lengths.tolist()):
        ref = F.scaled_dot_product_attention(
            q[row, :, None], k[row, :, :length], v[row, :, :length], scale=0.25, enable_gqa=True
        )[:, 0]
        torch.testing.assert_close(out[row], ref, rtol=0, atol=1e-6)
