"""The running batch of a compact forward: packed tokens, rows of the paged KV pool, per-sequence attention.

Batch invariance by construction (a request's ids and logprobs are bitwise the same alone or in
any batch, on CPU):
- no padding inside a sequence: prompts are packed one after another ([N, hidden], N = real
  tokens), and each row's attention reads exactly its own cached tokens (its pages of the
  `KVPool`, gathered into the layout attention reads: app/engine/kv/kv_pool.py);
- every GEMM sees a row count that is a multiple of the model's `row_multiple` (zero rows are
  appended; `ForwardOptions.row_multiple`): oneDNN's kernels then give a row the same bits whatever the other rows are, while a
  single fp32 row (and bf16 row, for inputs 1536+ wide) takes another kernel (measured; see
  app/engine/models/base.py);
- prefill: attention calls per row, on the same shapes as alone. (Rows of equal lengths batched
  into one SDPA call do NOT give the bits of the call alone: measured, torch 2.13 CPU.) A prompt's
  queries go in chunks of ATTENTION_CHUNK positions, one call each over exactly the keys up to
  the chunk's end (`_chunked_attention`), so a prompt whose first chunks come from the prefix cache
  (app/engine/kv/prefix_cache.py, pages shared by reference) computes its other chunks with the same
  bits as without the cache,
  and the cached chunks' K/V do not depend on the length of the prompt that stored them. (One
  causal call over the whole prompt differed in the last bits from a call over its suffix in 16 of
  80 prompts; chunks over all the prompt's keys gave K/V that depended on the prompt's length
  past ~200 tokens: measured, torch 2.13 CPU.) Decode: one set of ops for the
  whole batch whose reductions have shapes fixed by the row alone (app/engine/models/attention.py).
The interface is `Batch`'s, so the scheduler drives either.
"""

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from app.engine.core.sequence import Sequence
from app.engine.core.types import AdapterRef
from app.engine.kv.kv_pool import KVPool, PagedRows, page_width
from app.engine.models.attention import chunk_width, decode_attention, paged_decode_attention, paged_kernel
from app.engine.models.base import CompactModel, pad_rows, padded_rows
from app.engine.models.lora import LoraRows
from app.engine.runner.forward_options import ForwardOptions
from app.engine.sample.sampling import SamplingState

# Prefill attention runs in query chunks of this many positions when batch invariant, and the
# prefix cache shares pages of this size: a cached prefix always ends on a chunk boundary.
ATTENTION_CHUNK = 16


class CompactBatch:
    def __init__(self, seqs: list[Sequence], cache: PagedRows) -> None:
        self.seqs = seqs
        self.cache = cache
        self.next_ids = torch.zeros(len(seqs), dtype=torch.long, device=cache.device)
        self.sampling = SamplingState.of(seqs)  # built once per row; follows filter and extend

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
        options: ForwardOptions,
        seqs: list[Sequence],
        all_logits: bool,
        pool: KVPool | None = None,
        prefixes: Seq[list[int]] | None = None,
    ) -> tuple["CompactBatch", torch.Tensor, torch.Tensor | None]:
        """Run the prompts of `seqs` (packed) through `model` as `options` say, into pages of
        `pool` (None: a pool of their own in `options.kv_dtype`, for standalone use). Returns the
        batch, the last position's logits [batch, vocab], and the logits of every position run
        [batch, longest prompt, vocab] (left-padded, as `Batch` gives them) when `all_logits`.

        `prefixes[r]`, when given, is row r's pages from the prefix cache (one reference each,
        which the batch takes over): the K/V of its first c prompt tokens (c < its prompt length,
        a whole number of pages). Those tokens are not run (their logits, if asked for, are zeros)
        and nothing is copied: the row's page table starts with those pages."""
        if pool is None:
            pool = KVPool(model.layers, model.kv_heads, model.head_dim, options.kv_dtype, model.device)
        tables = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in seqs]
        starts = [len(t) * pool.page_size for t in tables]
        cache = PagedRows(pool, tables, list(starts))  # owns the prefix pages from here on
        counts = [s.prompt_len - c for s, c in zip(seqs, starts, strict=True)]
        longest = max(s.prompt_len for s in seqs)
        ids = [t for s, c in zip(seqs, starts, strict=True) for t in s.request.prompt_ids[c:]]
        positions = [p for s, c in zip(seqs, starts, strict=True) for p in range(c, s.prompt_len)]
        hidden = _forward(model, options, cache, ids, positions, counts, [s.adapter for s in seqs], prompt=True)
        ends = torch.tensor(counts, device=model.device).cumsum(0) - 1
        logits = _head(model, options, hidden.index_select(0, ends))
        full = None
        if all_logits:
            every = _head(model, options, hidden[: len(ids)])
            full = every.new_zeros((len(seqs), longest, every.shape[-1]))
            start = 0
            for row, count in enumerate(counts):
                full[row, longest - count :] = every[start : start + count]
                start += count
        return cls(list(seqs), cache), logits, full

    def decode(self, model: CompactModel, options: ForwardOptions) -> torch.Tensor:
        """One step for every row: feed `next_ids`, return next-token logits [batch, vocab].

        Batch invariant: `decode_logits`, compiled when `options` has a compiled decode step
        (TEXTGEN_COMPILE) and no row has an adapter (the server refuses the two together)."""
        lengths = self.cache.lengths
        real = len(self)
        after = [length + 1 for length in lengths]
        adapters = [s.adapter for s in self.seqs]
        compiled = options.compiled
        if not options.batch_invariant and compiled is None:
            hidden = _forward(model, options, self.cache, self.next_ids, lengths, [1] * real, adapters)
            return _head(model, options, hidden)[:real]
        self.cache.grow(after)
        multiple = options.row_multiple(model)
        lora = LoraRows.build(model, adapters, [1] * real, multiple)
        device = self.cache.device
        n = padded_rows(real, multiple)
        if compiled is not None:
            # torch specializes a graph for 1 row, whose bits differ from the general graph's (bf16
            # rows alone and batched differed): compiled steps run 2+ rows, so one graph serves all.
            n = max(n, 2)
        ids = torch.zeros(n, dtype=torch.long, device=device)
        ids[:real] = self.next_ids
        positions = torch.zeros(n, dtype=torch.long, device=device)
        positions[:real] = torch.tensor(lengths, device=device)
        step = compiled if compiled is not None and lora is None else decode_logits
        with decode_context(self.cache, after):
            logits = step(model, ids, positions, lora)
        self.cache.lengths = after
        return logits[:real]

    def set_next(self, ids: Seq[int]) -> None:
        self.next_ids = torch.tensor(list(ids), dtype=torch.long, device=self.cache.device)

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (ascending)."""
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.next_ids = self.next_ids[torch.tensor(keep, dtype=torch.long, device=self.cache.device)]
        self.sampling = self.sampling.filter(keep)
        self.cache.select(keep)

    def extend(self, other: "CompactBatch") -> None:
        """Append `other`'s rows."""
        self.cache.concatenate(other.cache)
        self.seqs += other.seqs
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.sampling = self.sampling.concat(other.sampling)


def _head(model: CompactModel, options: ForwardOptions, hidden: torch.Tensor) -> torch.Tensor:
    return model.head(pad_rows(hidden, options.row_multiple(model)))[: hidden.shape[0]]


@dataclass
class DecodeContext:
    """What a decode step's attention reads besides the layer's q/k/v: the rows' pages, where each
    real row writes its new token (`PagedRows.slots`), the index that gathers their pages
    (`PagedRows.gather_index`), the real rows' lengths after this token [real] and the key columns
    attention reads (`chunk_width` of the longest). Held outside the traced function, as vLLM's
    forward context holds its KV caches, so the compiled graph's inputs are the step's tokens alone."""

    cache: PagedRows
    slots: tuple[torch.Tensor, torch.Tensor]
    index: torch.Tensor | None  # the gather's, where the paged kernel does not run
    tables: torch.Tensor | None  # the rows' page tables, where it does
    lengths: torch.Tensor
    width: int
    kernel: ModuleType | None  # the paged attention kernel when it takes this pool (chosen once a step)


_context: list[DecodeContext] = []  # the step running now (the engine thread runs one at a time)


@contextmanager
def decode_context(cache: PagedRows, after: list[int]) -> Iterator[None]:
    """A decode step of every row of `cache`, whose lengths become `after` (pages for them exist:
    `PagedRows.grow`): row r writes its token at position after[r] - 1."""
    real = len(after)
    width = chunk_width(max(after))
    rows = list(range(real))
    slots = cache.slots(rows, [a - 1 for a in after])
    pool = cache.pool
    kernel = paged_kernel(pool.kv[0], pool.head_dim)
    index = None if kernel is not None else cache.gather_index(rows, width)
    tables = cache.page_table(rows, width) if kernel is not None else None
    lengths = torch.tensor(after, device=cache.device)
    _context.append(DecodeContext(cache, slots, index, tables, lengths, width, kernel))
    try:
        yield
    finally:
        _context.pop()


def decode_logits(
    model: CompactModel, ids: torch.Tensor, positions: torch.Tensor, lora: LoraRows | None = None
) -> torch.Tensor:
    """One batch-invariant decode step, inside `decode_context`: the logits [n, vocab] of the next
    token of every row. ids, positions: [n] (the batch padded to `padded_rows` with zeros); the
    first `real` rows (the context's lengths) write their new keys/values at column
    `positions[row]`. TEXTGEN_COMPILE traces this function (app/engine/runner/compiled.py); the cache
    write and attention are an opaque op there, so the graph's shapes depend on `n` alone."""
    attend_op = decode_attend if torch.compiler.is_compiling() else _decode_attend

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend_op(layer, q, k, v, positions)

    return model.head(model.forward(ids, positions, attend, lora))


def _decode_attend(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Write the real rows' new keys/values into layer `layer`'s cache and attend: q [n, heads,
    dim], k, v [n, kv_heads, dim], positions [n] -> [n, heads * dim] (padding rows: zeros)."""
    step = _context[-1]
    n, heads, dim = q.shape
    real = step.lengths.shape[0]
    step.cache.write(layer, step.slots, k[:real], v[:real])
    if step.kernel is not None:
        assert step.tables is not None
        pool_layer = step.cache.pool.kv[layer]
        o = paged_decode_attention(step.kernel, q[:real], pool_layer, step.tables, step.lengths, dim**-0.5)
    else:
        assert step.index is not None
        keys, values = step.cache.gather(layer, step.index, real, step.width)
        o = decode_attention(q[:real], keys, values, step.lengths, dim**-0.5, step.width)
    if real == n:
        return o.reshape(n, heads * dim)
    out = o.new_zeros((n, heads * dim))
    out[:real] = o.reshape(real, heads * dim)
    return out


# The same, as an op torch.compile does not trace into: the cache's and the real rows' shapes would
# each specialize graphs (sizes of 1, layouts); outside, one graph serves every step.
decode_attend = torch.library.custom_op("textgen::decode_attend", mutates_args=())(_decode_attend)


@decode_attend.register_fake
def _(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))


def _forward(
    model: CompactModel,
    options: ForwardOptions,
    cache: PagedRows,
    ids: torch.Tensor | list[int],
    positions: list[int],
    counts: list[int],
    adapters: Seq[AdapterRef | None] | None = None,
    prompt: bool = False,
) -> torch.Tensor:
    """Append `counts[r]` new tokens to each row r of `cache` (ids and positions packed row after
    row) and return their final hidden states [N, hidden] (N rounded up to `options.row_multiple`).
    `adapters[r]`: row r's LoRA adapter (None: the base model). `prompt`: the new tokens are the
    rest of each row's prompt (a prefill, even of one token)."""
    device = cache.device
    real = sum(counts)
    invariant = options.batch_invariant
    multiple = options.row_multiple(model)
    n = padded_rows(real, multiple)
    id_tensor = torch.zeros(n, dtype=torch.long, device=device)
    id_tensor[:real] = torch.as_tensor(ids, device=device)
    pos_tensor = torch.zeros(n, dtype=torch.long, device=device)
    pos_tensor[:real] = torch.as_tensor(positions, device=device)
    before = cache.lengths
    after = [b + c for b, c in zip(before, counts, strict=True)]
    cache.grow(after)
    slots = cache.slots(
        [r for r, c in enumerate(counts) for _ in range(c)],
        [b + j for b, c in zip(before, counts, strict=True) for j in range(c)],
    )
    decode = not invariant and not prompt and real == len(counts)  # decode without the guarantee
    width = page_width(max(after))
    index = cache.gather_index(list(range(len(counts))), width) if decode else None
    row_index = [] if decode else [cache.gather_index([r], page_width(a)) for r, a in enumerate(after)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    heads, dim = model.heads, model.head_dim
    valid = None
    if decode:
        valid = torch.arange(width, device=device)[None, :] < torch.tensor(after, device=device)[:, None]
    gqa = model.kv_heads != heads
    chunked = prompt and invariant
    masks = [_chunk_masks(first, last, device) for first, last in zip(before, after, strict=True)] if chunked else []

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.write(layer, slots, k[:real], v[:real])
        # Batch-invariant decode steps run `decode_logits`; a prompt whose cached prefix leaves one
        # token per row has real == len(counts) too, but takes the prompt's chunked path below.
        if decode:
            assert valid is not None and index is not None  # built above under the same condition
            keys, values = cache.gather(layer, index, real, width)
            o = F.scaled_dot_product_attention(
                q[:real, :, None],
                keys.to(q.dtype),
                values.to(q.dtype),
                attn_mask=valid[:, None, None, :],
                enable_gqa=gqa,
            )
            return o.reshape(real, heads * dim)
        out = q.new_zeros((n, heads * dim))
        for row, (first, last) in enumerate(zip(before, after, strict=True)):
            count, start = last - first, offsets[row]
            keys, values = cache.gather(layer, row_index[row], 1, page_width(last))
            kr = keys[0, :, :last].to(q.dtype)  # [kv_heads, last, dim]
            vr = values[0, :, :last].to(q.dtype)
            if chunked:
                out[start : start + count] = _chunked_attention(q[start : start + count], kr, vr, masks[row], gqa)
                continue
            qr = q[start : start + count].transpose(0, 1)[None]  # [1, heads, count, dim]
            mask = None
            if 1 < count < last:  # new tokens after cached ones: causal, bottom-right aligned
                mask = torch.ones((count, last), dtype=torch.bool, device=device).tril(last - count)
            o = F.scaled_dot_product_attention(
                qr, kr[None], vr[None], attn_mask=mask, is_causal=count > 1 and mask is None, enable_gqa=gqa
            )
            out[start : start + count] = o[0].transpose(0, 1).reshape(count, heads * dim)
        return out

    lora = LoraRows.build(model, adapters, counts, multiple) if adapters else None
    hidden = model.forward(id_tensor, pos_tensor, attend, lora)
    cache.lengths = after
    return hidden


def _chunk_masks(first: int, last: int, device: torch.device) -> list[torch.Tensor]:
    """The causal masks of a prompt's positions [first, last) (first a multiple of
    ATTENTION_CHUNK), one per chunk of ATTENTION_CHUNK queries (the last one padded with queries
    that see every key) over its keys [0, chunk end): [1, 1, ATTENTION_CHUNK, keys]."""
    assert first % ATTENTION_CHUNK == 0, f"a cached prefix of {first} tokens does not end on a chunk"
    masks = []
    for start in range(first, last, ATTENTION_CHUNK):
        end = min(start + ATTENTION_CHUNK, last)
        queries = torch.arange(start, start + ATTENTION_CHUNK, device=device)
        masks.append((torch.arange(end, device=device)[None, :] <= queries[:, None])[None, None])
    return masks


def _chunked_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masks: list[torch.Tensor], gqa: bool
) -> torch.Tensor:
    """Attention of a prompt's new queries q [count, heads, dim] over the row's keys and values
    [kv_heads, last, dim]: one call per chunk of ATTENTION_CHUNK queries (zero queries pad the
    last), over exactly the keys up to the chunk's end.

    A chunk's call then depends on its own queries and keys alone, never on the chunks before it
    nor on how long the prompt is: a prompt whose first chunks come from the prefix cache gets the
    same bits for the rest, whatever the length of the prompt that stored them. (With every chunk
    a batch entry of one call over all the prompt's keys [0, last), the K/V of a 216-token prompt's
    full blocks differed in the last bits from those of the same tokens in a 225-token prompt, so a
    cache hit from a prompt of another length changed logprobs: measured, torch 2.13 CPU.)"""
    count, heads, dim = q.shape
    out = q.new_empty((count, heads * dim))
    for i, mask in enumerate(masks):
        start = i * ATTENTION_CHUNK
        n = min(ATTENTION_CHUNK, count - start)
        end = mask.shape[-1]
        chunk = q.new_zeros((ATTENTION_CHUNK, heads, dim))
        chunk[:n] = q[start : start + n]
        o = F.scaled_dot_product_attention(
            chunk.transpose(0, 1)[None], keys[None, :, :end], values[None, :, :end], attn_mask=mask, enable_gqa=gqa
        )
        out[start : start + n] = o[0].transpose(0, 1).reshape(ATTENTION_CHUNK, heads * dim)[:n]
    return out
