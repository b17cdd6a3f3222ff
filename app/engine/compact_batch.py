"""The running batch of a compact forward: packed tokens, a `RowCache`, per-sequence attention.

Batch invariance by construction (a request's ids and logprobs are bitwise the same alone or in
any batch, on CPU):
- no padding inside a sequence: prompts are packed one after another ([N, hidden], N = real
  tokens), and each row's attention reads exactly its own cached tokens (a view of `RowCache`);
- every GEMM sees a row count that is a multiple of 4 (zero rows are appended): MKL's fp32 and
  bf16 kernels then give a row the same bits whatever the other rows are, while 1-3 leftover rows
  take other kernels (measured; ../shared/notes/measurements.md);
- attention calls per row, on the same shapes as alone. (Rows of equal lengths batched into
  one SDPA call do NOT give the bits of the call alone: measured, torch 2.13 CPU.) A prompt's
  queries go in chunks ending on multiples of ATTENTION_CHUNK positions, each over the keys up to
  its end, so a prompt whose first blocks come from the prefix cache (app/engine/prefix_cache.py)
  runs the very calls of its remaining chunks: the same bits as without the cache. (One causal
  call over the whole prompt differed in the last bits from the call over a suffix in 16 of 80
  prompts: measured, torch 2.13 CPU.)
The interface is `Batch`'s, so the scheduler drives either.
"""

from collections.abc import Sequence as Seq

import torch
import torch.nn.functional as F

from app.engine.models.base import ROW_MULTIPLE, CompactModel
from app.engine.row_cache import Account, RowCache
from app.engine.sequence import Sequence

# Prefill attention runs in query chunks aligned to this many positions when batch invariant, and
# the prefix cache stores blocks of this size: a cached prefix always ends on a chunk boundary.
ATTENTION_CHUNK = 16


def _padded(n: int, invariant: bool) -> int:
    return n + (-n) % ROW_MULTIPLE if invariant else n


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
        cls,
        model: CompactModel,
        seqs: list[Sequence],
        all_logits: bool,
        account: Account | None = None,
        prefixes: Seq[list[torch.Tensor]] | None = None,
    ) -> tuple["CompactBatch", torch.Tensor, torch.Tensor | None]:
        """Run the prompts of `seqs` (packed). Returns the batch, the last position's logits
        [batch, vocab], and the logits of every position run [batch, longest prompt, vocab]
        (left-padded, as `Batch` gives them) when `all_logits`.

        `prefixes[r]`, when given, is row r's blocks from the prefix cache: the K/V of its first
        c prompt tokens (c < its prompt length) in blocks [layers, 2, kv_heads, block, head_dim].
        Those tokens are copied into the cache instead of being run (their logits, if asked for,
        are zeros)."""
        blocks = list(prefixes) if prefixes is not None else [[] for _ in seqs]
        starts = [sum(b.shape[3] for b in row) for row in blocks]
        counts = [s.prompt_len - c for s, c in zip(seqs, starts, strict=True)]
        longest = max(s.prompt_len for s in seqs)
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
        for row, row_blocks in enumerate(blocks):
            column = 0
            for block in row_blocks:  # block by block: no uncounted copy of the whole prefix
                width = block.shape[3]
                for layer, kv in enumerate(cache.kv):
                    kv[:, row, :, column : column + width] = block[layer]
                column += width
        cache.lengths = starts
        ids = [t for s, c in zip(seqs, starts, strict=True) for t in s.request.prompt_ids[c:]]
        positions = [p for s, c in zip(seqs, starts, strict=True) for p in range(c, s.prompt_len)]
        hidden = _forward(model, cache, ids, positions, counts)
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

    def prompt_kv(self, row: int, start: int, end: int) -> torch.Tensor:
        """The K/V of row `row`'s tokens [start, end): [layers, 2, kv_heads, end - start, head_dim]
        (a new tensor)."""
        return torch.stack([kv[:, row, :, start:end] for kv in self.cache.kv])

    def decode(self, model: CompactModel) -> torch.Tensor:
        """One step for every row: feed `next_ids`, return next-token logits [batch, vocab]."""
        lengths = self.cache.lengths
        self.cache.reserve(len(self), max(lengths) + 1)
        hidden = _forward(model, self.cache, self.next_ids, lengths, [1] * len(self))
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
    padded = _padded(rows, model.batch_invariant)
    if padded != rows:
        hidden = torch.cat([hidden, hidden.new_zeros((padded - rows, hidden.shape[1]))])
    return model.head(hidden)[:rows]


def _forward(
    model: CompactModel,
    cache: RowCache,
    ids: torch.Tensor | list[int],
    positions: list[int],
    counts: list[int],
) -> torch.Tensor:
    """Append `counts[r]` new tokens to each row r of `cache` (ids and positions packed row after
    row) and return their final hidden states [N, hidden] (N rounded up to a multiple of 4)."""
    device = cache.device
    real = sum(counts)
    invariant = model.batch_invariant
    n = _padded(real, invariant)
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
        for row, (first, last) in enumerate(zip(before, after, strict=True)):
            # Invariant: queries in chunks that end on multiples of ATTENTION_CHUNK, each over keys
            # [0, its end), so a token's attention is the same call whichever earlier tokens came
            # from the prefix cache. Otherwise one call for all of the row's new tokens.
            step = ATTENTION_CHUNK if invariant else last
            pos = first
            while pos < last:
                end = min(last, (pos // step + 1) * step) if invariant else last
                count, start = end - pos, offsets[row] + pos - first
                qr = q[start : start + count].transpose(0, 1)[None]  # [1, heads, count, dim]
                kr = keys[row : row + 1, :, :end].to(q.dtype)
                vr = values[row : row + 1, :, :end].to(q.dtype)
                mask = None
                if 1 < count < end:  # new tokens after cached ones: causal, bottom-right aligned
                    mask = torch.ones((count, end), dtype=torch.bool, device=device).tril(end - count)
                o = F.scaled_dot_product_attention(
                    qr, kr, vr, attn_mask=mask, is_causal=count > 1 and mask is None, enable_gqa=gqa
                )
                out[start : start + count] = o[0].transpose(0, 1).reshape(count, heads * dim)
                pos = end
        return out

    hidden = model.forward(id_tensor, pos_tensor, attend)
    cache.lengths = after
    return hidden
