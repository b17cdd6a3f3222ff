"""Decode attention for a whole batch in one set of ops, with each row's bits independent of the batch.

One SDPA call per row is batch invariant but costs ~6 ops per row per layer (384 SDPA calls per
step at batch 32 on GPT-2), and one SDPA call over the padded batch is not invariant: its kernel
splits the work by batch size and padded width (measured, torch 2.13 CPU: 564 of 600 random
configurations differed from the row alone in the last bits). Here every reduction has a shape
fixed by the row alone:
- scores are dot products over `head_dim` (a batched GEMM whose per-element kernel does not depend
  on the batch or on the number of keys);
- keys past a row's length are masked to -inf, so they add exact zeros;
- the softmax denominator and the weighted sum of values are taken in chunks of `CHUNK` keys
  (fixed-size reductions) and the chunks summed in order, left to right, so chunks that are all
  padding add +0.0 at the end and change nothing.
Tested against the row alone over random batch sizes, positions, lengths and padded widths
(tests/unit/engine/test_attention.py). Its values match SDPA's within ~2e-7 (fp32).
"""

import torch
import torch.nn.functional as F

CHUNK = 64  # keys per fixed-size reduction; a multiple of every CPU vector width


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one new query per row over that row's cached keys.

    q: [B, heads, dim]; keys, values: [B, kv_heads, columns, dim] (a view of the KV cache; columns
    may be wider than the longest row, the extra columns are ignored); lengths: [B] long, each row's
    number of valid keys (>= 1). heads must be a multiple of kv_heads (grouped-query attention).
    Returns [B, heads, dim] in q's dtype.
    """
    if q.dtype != torch.float32:
        # Half-precision GEMMs' per-element results depend on the key count in other ways than
        # fp32's (measured: bf16 rows differed alone vs batched); reduce in fp32 and convert back.
        return decode_attention(q.float(), keys, values, lengths, scale).to(q.dtype)
    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    longest = int(lengths.max())
    width = -(-longest // CHUNK) * CHUNK
    have = min(width, keys.shape[2])
    qg = q.view(batch, kv_heads, group, dim)
    scores = _scores(qg, keys, have, width) * scale  # [B, kv_heads, group, width]
    masked = torch.arange(width, device=q.device)[None, :] >= lengths[:, None]  # [B, width]
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    chunks = width // CHUNK
    denominator = weights.view(batch, kv_heads, group, chunks, CHUNK).sum(-1).cumsum(-1)[..., -1:]
    out = None
    for c in range(chunks):
        start = c * CHUNK
        v = values[:, :, start : min(start + CHUNK, have)]
        if v.shape[2] < CHUNK:  # the cache ends inside this chunk: pad so the reduction keeps its shape
            v = F.pad(v, (0, 0, 0, CHUNK - v.shape[2]))
        if v.dtype != q.dtype:
            v = v.to(q.dtype)
        part = torch.matmul(weights[..., start : start + CHUNK], v)  # [B, kv_heads, group, dim]
        out = part if out is None else out + part
    assert out is not None  # chunks >= 1 since lengths >= 1
    return (out / denominator).view(batch, heads, dim)


def _scores(qg: torch.Tensor, keys: torch.Tensor, have: int, width: int) -> torch.Tensor:
    """q . k for the first `width` columns (a multiple of CHUNK), of which the cache holds `have`.

    A GEMM's per-element result depends on the number of key columns unless that is a multiple of
    4 (measured), so the keys are read whole chunks at a time: a chunk the cache ends inside is
    copied into a zero-padded one, and chunks past the cache score -inf."""
    full = have // CHUNK * CHUNK
    parts = []
    if full:
        parts.append(torch.matmul(qg, keys[:, :, :full].to(qg.dtype).transpose(-1, -2)))
    if have > full:
        tail = keys.new_zeros((*keys.shape[:2], CHUNK, keys.shape[3]))
        tail[:, :, : have - full] = keys[:, :, full:have]
        parts.append(torch.matmul(qg, tail.to(qg.dtype).transpose(-1, -2)))
    scored = sum(p.shape[-1] for p in parts)
    if scored < width:
        parts.append(qg.new_full((*qg.shape[:3], width - scored), float("-inf")))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
