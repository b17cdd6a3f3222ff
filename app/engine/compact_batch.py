"""The running batch of a compact forward: packed tokens, a `RowCache`, per-sequence attention.

Batch invariance by construction (a request's ids and logprobs are bitwise the same alone or in
any batch, on CPU):
- no padding inside a sequence: prompts are packed one after another ([N, hidden], N = real
  tokens), and each row's attention reads exactly its own cached tokens (a view of `RowCache`);
- every GEMM sees a row count that is a multiple of the model's `row_multiple` (zero rows are
  appended): oneDNN's kernels then give a row the same bits whatever the other rows are, while a
  single fp32 row takes another kernel (measured; see app/engine/models/base.py);
- one attention call per row, on the same shapes as alone. (Rows of equal lengths batched into
  one SDPA call do NOT give the bits of the call alone: measured, torch 2.13 CPU.)
The interface is `Batch`'s, so the scheduler drives either.
"""

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F

from app.engine.lora import Adapter, LoraRows
from app.engine.models.base import CompactModel
from app.engine.row_cache import Account, RowCache
from app.engine.sequence import Sequence


def _padded(n: int, model: CompactModel) -> int:
    return n + (-n) % model.row_multiple if model.batch_invariant else n


class CompactBatch:
    def __init__(self, seqs: list[Sequence], cache: RowCache) -> None:
        self.seqs = seqs
        self.cache = cache
        self.next_ids = torch.zeros(len(seqs), dtype=torch.long, device=cache.device)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        """The longest row, in cached tokens."""
        return max(self.cache.lengths, default=0)

    @classmethod
    def prefill(
        cls, model: CompactModel, seqs: list[Sequence], all_logits: bool, account: Account | None = None
    ) -> tuple["CompactBatch", torch.Tensor, torch.Tensor | None]:
        """Run the prompts of `seqs` (packed). Returns the batch, the last position's logits
        [batch, vocab], and every position's logits [batch, longest prompt, vocab] (left-padded,
        as `Batch` gives them) when `all_logits`."""
        counts = [s.prompt_len for s in seqs]
        longest = max(counts)
        cache = RowCache(
            model.layers,
            model.kv_heads,
            model.head_dim,
            model.kv_dtype,
            model.device,
            account,
            columns=longest if account is not None else None,
        )
        cache.reserve(len(seqs), longest)
        cache.lengths = [0] * len(seqs)
        ids = [t for s in seqs for t in s.request.prompt_ids]
        positions = [p for c in counts for p in range(c)]
        hidden = _forward(model, cache, ids, positions, counts, [s.adapter for s in seqs])
        ends = torch.tensor(counts, device=model.device).cumsum(0) - 1
        logits = _head(model, hidden.index_select(0, ends))
        full = None
        if all_logits:
            every = _head(model, hidden[: len(ids)])
            full = every.new_zeros((len(seqs), longest, every.shape[-1]))
            start = 0
            for row, count in enumerate(counts):
                full[row, longest - count :] = every[start : start + count]
                start += count
        return cls(list(seqs), cache), logits, full

    def decode(self, model: CompactModel) -> torch.Tensor:
        """One step for every row: feed `next_ids`, return next-token logits [batch, vocab]."""
        lengths = self.cache.lengths
        self.cache.reserve(len(self), max(lengths) + 1)
        adapters = [s.adapter for s in self.seqs]
        hidden = _forward(model, self.cache, self.next_ids, lengths, [1] * len(self), adapters)
        return _head(model, hidden)[: len(self)]

    def set_next(self, ids: Seq[int]) -> None:
        self.next_ids = torch.tensor(list(ids), dtype=torch.long, device=self.cache.device)

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (ascending)."""
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.next_ids = self.next_ids[torch.tensor(keep, dtype=torch.long, device=self.cache.device)]
        self.cache.select(keep)

    def extend(self, other: "CompactBatch") -> None:
        """Append `other`'s rows."""
        self.cache.concatenate(other.cache)
        self.seqs += other.seqs
        self.next_ids = torch.cat([self.next_ids, other.next_ids])


def _head(model: CompactModel, hidden: torch.Tensor) -> torch.Tensor:
    rows = hidden.shape[0]
    padded = _padded(rows, model)
    if padded != rows:
        hidden = torch.cat([hidden, hidden.new_zeros((padded - rows, hidden.shape[1]))])
    return model.head(hidden)[:rows]


def _forward(
    model: CompactModel,
    cache: RowCache,
    ids: torch.Tensor | list[int],
    positions: list[int],
    counts: list[int],
    adapters: list[Adapter | None] | None = None,
) -> torch.Tensor:
    """Append `counts[r]` new tokens to each row r of `cache` (ids and positions packed row after
    row) and return their final hidden states [N, hidden] (N rounded up to `row_multiple`).
    `adapters[r]`: row r's LoRA adapter (None: the base model)."""
    device = cache.device
    real = sum(counts)
    invariant = model.batch_invariant
    n = _padded(real, model)
    id_tensor = torch.zeros(n, dtype=torch.long, device=device)
    id_tensor[:real] = torch.as_tensor(ids, device=device)
    pos_tensor = torch.zeros(n, dtype=torch.long, device=device)
    pos_tensor[:real] = torch.as_tensor(positions, device=device)
    before = cache.lengths
    after = [b + c for b, c in zip(before, counts, strict=True)]
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    columns = torch.tensor([b + j for b, c in zip(before, counts, strict=True) for j in range(c)], device=device)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    heads, dim = model.heads, model.head_dim
    valid = None
    if not invariant and real == len(counts):
        valid = torch.arange(max(after), device=device)[None, :] < torch.tensor(after, device=device)[:, None]
    gqa = model.kv_heads != heads

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = cache.keys(layer), cache.values(layer)
        keys[rows, :, columns] = k[:real].to(keys.dtype)
        values[rows, :, columns] = v[:real].to(values.dtype)
        if not invariant and real == len(counts):  # decode without the guarantee: one padded call
            assert valid is not None  # built above under the same condition
            width = max(after)
            o = F.scaled_dot_product_attention(
                q[:real, :, None],
                keys[:real, :, :width].to(q.dtype),
                values[:real, :, :width].to(q.dtype),
                attn_mask=valid[:, None, None, :width],
                enable_gqa=gqa,
            )
            return o.reshape(real, heads * dim)
        out = q.new_zeros((n, heads * dim))
        for row, (count, length) in enumerate(zip(counts, after, strict=True)):
            start = offsets[row]
            qr = q[start : start + count].transpose(0, 1)[None]  # [1, heads, count, dim]
            kr = keys[row : row + 1, :, :length].to(q.dtype)
            vr = values[row : row + 1, :, :length].to(q.dtype)
            mask = None
            if 1 < count < length:  # new tokens after cached ones: causal, bottom-right aligned
                mask = torch.ones((count, length), dtype=torch.bool, device=device).tril(length - count)
            o = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=mask, is_causal=count > 1 and mask is None, enable_gqa=gqa
            )
            out[start : start + count] = o[0].transpose(0, 1).reshape(count, heads * dim)
        return out

    lora = LoraRows.build(model, adapters, counts) if adapters else None
    hidden = model.forward(id_tensor, pos_tensor, attend, lora)
    cache.lengths = after
    return hidden
