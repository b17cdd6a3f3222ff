"""Decode attention for a whole batch in one set of ops, with each row's bits independent of the batch.

One SDPA call per row is batch invariant but costs ~6 ops per row per layer (384 SDPA calls per
step at batch 32 on GPT-2), and one SDPA call over the padded batch is not invariant: its kernel
splits the work by batch size and padded width (measured, torch 2.13 CPU: 564 of 600 random
configurations differed from the row alone in the last bits). Here every reduction has a shape
fixed by the row alone:
- scores are dot products over `head_dim`: a batched GEMM over a multiple of CHUNK key columns,
  whose per-element kernel then does not depend on the batch or on the number of keys (measured;
  with other column counts it does, for small head_dim: 16 differed, torch 2.13 CPU);
- keys past a row's length are masked to -inf, so they add exact zeros;
- the softmax denominator and the weighted sum of values are taken in chunks of `CHUNK` keys
  (fixed-size reductions, one batched GEMM for all chunks), and the chunks are summed in order,
  left to right (a cumulative sum), so chunks that are all padding add +0.0 at the end and change
  nothing.
The KV pool (app/engine/kv/kv_pool.py) keeps 16-token pages; a step gathers each row's pages into
`keys`/`values` of a multiple of CHUNK columns (one contiguous tensor each: keys and values as
interleaved views of one tensor gave a row other bits alone than batched, measured), so every
chunk is whole, and there is no Python loop (the compiled decode step traces it as one graph for
every width). Tested against the row alone over random batch sizes, positions, lengths
and cache widths (tests/unit/engine/test_attention.py). Its values match SDPA's within ~2e-7 (fp32).

On CPU with AVX-512, decode steps run `paged_decode_attention` instead: one C++ call per layer
(paged_attention.cpp, built with the GEMM kernels of invariant_gemm.py) that reads each row's keys
and values from the pool's pages in place, each (row, head) in one fixed order. Why our own: the
ops above cost ~25 dispatches per layer, ~0.3 ms at 1 row, plus the gather's copy of every row's
K/V; GPT-2-124M's whole attention at 1 row took 3.8 ms of an int8 step of 9.1 ms (measured
2026-12-06, 2 threads); no library op attends over a page table on CPU with per-row fixed
reductions (SDPA's CPU kernels take a dense [B, heads, keys, dim] and split by batch shape). Where
the extension does not build, the ops above run, on gathered pages.
"""

from types import ModuleType

import torch

from app.engine.models import invariant_gemm

CHUNK = 64  # keys per fixed-size reduction and the KV cache's column granularity


def chunk_width(length: int) -> int:
    """`length` rounded up to a multiple of CHUNK: the key columns attention reads for it."""
    return -(-length // CHUNK) * CHUNK


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float, width: int
) -> torch.Tensor:
    """Attention of one new query per row over that row's cached keys.

    q: [B, heads, dim]; keys, values: [B, kv_heads, columns, dim] (a view of the KV cache, columns
    >= width); lengths: [B] long, each row's number of valid keys (>= 1); width: a multiple of
    CHUNK at least the longest length (`chunk_width`); columns past a row's length are ignored
    (they must hold finite values, as the cache's do). heads must be a multiple of kv_heads
    (grouped-query attention). Returns [B, heads, dim] in q's dtype.
    """
    if q.dtype != torch.float32:
        # Half-precision GEMMs' per-element results depend on the key count in other ways than
        # fp32's (measured: bf16 rows differed alone vs batched); reduce in fp32 and convert back.
        return decode_attention(q.float(), keys, values, lengths, scale, width).to(q.dtype)
    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    chunks = width // CHUNK
    k = keys[:, :, :width].to(q.dtype)  # no copy when the cache is fp32
    v = values[:, :, :width].to(q.dtype)
    qg = q.view(batch, kv_heads, group, dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, kv_heads, group, width]
    masked = torch.arange(width, device=q.device)[None, :] >= lengths[:, None]  # [B, width]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    per_chunk = weights.view(batch, kv_heads, group, chunks, CHUNK)
    denominator = per_chunk.sum(-1).cumsum(-1)[..., -1:]  # [B, kv_heads, group, 1], chunks left to right
    # [B, kv_heads, chunks, group, CHUNK] @ [B, kv_heads, chunks, CHUNK, dim]: one GEMM of K = CHUNK per chunk
    parts = torch.matmul(per_chunk.transpose(2, 3), v.reshape(batch, kv_heads, chunks, CHUNK, dim))
    out = parts.cumsum(2)[:, :, -1]  # [B, kv_heads, group, dim], chunks left to right
    return (out / denominator).reshape(batch, heads, dim)


_paged = [True]


def paged_kernel(pool_layer: torch.Tensor, head_dim: int) -> ModuleType | None:
    """The extension with `paged_decode_attention` and `paged_write` when they take this pool
    (CPU, fp32 or bf16, head_dim <= 128) and `use_paged_kernel(False)` was not called, else None."""
    if not _paged[0] or pool_layer.device.type != "cpu" or head_dim > 128:
        return None
    if pool_layer.dtype not in (torch.float32, torch.bfloat16):
        return None
    return invariant_gemm.kernel()


def use_paged_kernel(flag: bool) -> None:
    """Run decode attention on the paged kernel where it takes the pool (True, the default) or on
    gathered pages with `decode_attention` (False: the path where the extension does not build;
    tests and `python -m bench.step` compare the two)."""
    _paged[0] = flag


def paged_decode_attention(
    kernel: ModuleType,
    q: torch.Tensor,
    pool_layer: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new query per row over that row's cached keys, read from the pool's pages.

    q: [B, heads, dim]; pool_layer: [pages, 2, kv_heads, page_size, dim] (one layer of the KV pool,
    fp32 or bf16); tables: [B, P] long, row b's pages in order (P * page_size >= lengths[b]);
    lengths: [B] long, each row's number of valid keys (>= 1). Returns [B, heads, dim] in q's
    dtype, computed in fp32; each row's bits depend on its own query, keys and length alone.
    Raises RuntimeError (from the extension) on shapes or lengths that do not fit."""
    out = kernel.paged_decode_attention(q.float(), pool_layer, tables, lengths, scale)
    return out.to(q.dtype)
