"""Exact speculative decoding with prompt-lookup (n-gram) drafts (TEXTGEN_SPECULATIVE=ngram).

Drafting needs no draft model: the newest n tokens of a sequence (n from `ngram_max` down to
`ngram_min`) are looked up in its own prompt and output, and the k tokens that followed the match
are the draft (prompt-lookup decoding, vLLM's `ngram` method).

Verification is exact: a request's token ids *and logprobs* are bitwise those of speculation off,
greedy and seeded. Why it holds, on the batch-invariant compact forward (CPU):
- the verify step is a decode step with more rows. A sequence with k drafts contributes k + 1 rows
  (its pending token and the drafts, at positions L..L+k) to the same GEMMs (oneDNN gives a row the
  same bits for any row count >= 2, the property batch invariance already rests on) and the same
  LoRA row groups;
- attention gives the query at offset j what a decode step of length L + j + 1 gives it: the paged
  kernel takes one page table and length per query (every query in one call; keys past the length,
  written for later drafts, are never read), and without it `decode_attention` runs once per draft
  offset j over the same cache rows as a decode step, with row lengths L + j + 1: the keys written
  for later drafts lie past that length and are masked to -inf before the softmax, exactly like a
  decode step's unused columns, and the column width is a multiple of CHUNK as in a decode step
  (the kernel is invariant to it);
- tokens are chosen one offset at a time with `choose`, after the previous offset's token was
  appended: penalties, grammar state, `min_new_tokens` and each row's generator see what they see
  without speculation, and a seeded row draws once per emitted token, in order. A draft is accepted
  only if the chosen token equals it (so sampling accepts less often than greedy, but exactly);
- rejected drafts' keys/values are rolled back: the row's length returns to what it emitted and the
  columns past it are zeroed, so the cache is what non-speculative decoding leaves.
Speculation therefore runs only where that proof holds: the compact forward, batch invariant and
not compiled (the compiled step's fused norms round differently from the eager step verify runs);
elsewhere the engine logs why and decodes normally. Rows that find no draft take one row each in
the verify step; a step where no row drafts is a plain decode step. A sequence whose whole draft
was rejected skips drafting for a few steps (`Drafter`), so drafts that keep failing cost little.
"""

import weakref
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from app.engine.core.sequence import Sequence
from app.engine.models.attention import chunk_width, decode_attention, paged_decode_attention, paged_kernel
from app.engine.models.base import CompactModel, padded_rows
from app.engine.models.lora import LoraRows
from app.engine.runner.compact_batch import CompactBatch
from app.engine.runner.forward_options import ForwardOptions


@dataclass(frozen=True)
class SpeculativeConfig:
    """`num_tokens`: the most draft tokens per sequence and step (k); an n-gram of `ngram_min` to
    `ngram_max` tokens (the longest that matches wins) must match for a draft."""

    num_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4


def unsupported_reason(options: ForwardOptions | None) -> str | None:
    """Why speculation cannot be exact on a forward run with `options` (None: the transformers
    forward), or None when it can."""
    if options is None:
        return "the transformers forward (only GPT-2 and Llama on the compact forward verify exactly)"
    if not options.batch_invariant:
        return "a forward that is not batch invariant (TEXTGEN_BATCH_INVARIANT=false, int8-weight-only, or GPU)"
    if options.compiled is not None:
        return "TEXTGEN_COMPILE (the compiled step rounds differently from the eager verify step)"
    return None


def propose(ids: Seq[int], config: SpeculativeConfig, limit: int) -> list[int]:
    """Up to `limit` (<= config.num_tokens) tokens that followed an earlier occurrence of the
    newest n-gram of `ids` (n from ngram_max down to ngram_min, the longest that matches). Of
    several occurrences: the newest that has `limit` tokens after it, else the oldest (the one
    with the most). Empty when nothing matches."""
    limit = min(limit, config.num_tokens)
    size = len(ids)
    if limit <= 0 or size <= config.ngram_min:
        return []
    tokens = np.asarray(ids, dtype=np.int64)
    for n in range(min(config.ngram_max, size - 1), config.ngram_min - 1, -1):
        # Windows that start before the newest n-gram's own position and leave >= 1 token after them.
        windows = sliding_window_view(tokens[: size - 1], n)
        starts = np.flatnonzero((windows == tokens[size - n :]).all(axis=1))
        if starts.size == 0:
            continue
        full = starts[starts + n + limit <= size]
        start = int(full[-1] if full.size else starts[0]) + n
        return tokens[start : start + limit].tolist()
    return []


def draft(seq: Sequence, config: SpeculativeConfig) -> list[int]:
    """`seq`'s draft for the next step: never more tokens than it may still emit, less the one the
    verify step always emits."""
    emitted = len(seq.generated)
    left = min(
        seq.request.stopping.max_new_tokens - emitted,
        seq.max_total_tokens - seq.prompt_len - emitted,
    )
    return propose(seq.all_ids(), config, left - 1)


# After a step whose draft was rejected whole, a sequence skips drafting for this many steps,
# doubled on each further whole rejection up to MAX_BACKOFF, and reset by any accepted token: where
# drafts keep failing (output that recurs in its context but does not copy it) the verify step's
# extra rows cost ~25% a token (bench.spec's adversarial workload); this bounds that to a few %.
MAX_BACKOFF = 16


@dataclass
class _Backoff:
    penalty: int = 0  # the last wait imposed
    wait: int = 0  # steps left without drafting


class Drafter:
    """Drafts for the rows of a batch, with a back-off per sequence for drafts that keep failing.
    Drafting only decides how many tokens a step may verify, never which tokens come out."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._state: weakref.WeakKeyDictionary[Sequence, _Backoff] = weakref.WeakKeyDictionary()

    def drafts(self, seqs: Seq[Sequence]) -> list[list[int]]:
        out: list[list[int]] = []
        for seq in seqs:
            state = self._state.get(seq)
            if state is not None and state.wait > 0:
                state.wait -= 1
                out.append([])
                continue
            out.append(draft(seq, self.config))
        return out

    def record(self, seqs: Seq[Sequence], drafts: Seq[Seq[int]], accepted: Seq[int]) -> None:
        """What `accept` accepted of each row's draft (rows without one are left as they are)."""
        for seq, d, a in zip(seqs, drafts, accepted, strict=True):
            if not d:
                continue
            state = self._state.setdefault(seq, _Backoff())
            if a:
                state.penalty = 0
            else:
                state.penalty = min(MAX_BACKOFF, max(1, 2 * state.penalty))
                state.wait = state.penalty


def verify(batch: CompactBatch, model: CompactModel, options: ForwardOptions, drafts: list[list[int]]) -> torch.Tensor:
    """Run each row's pending token (`batch.next_ids`) and its draft through the model as one
    batch-invariant decode step (`options` batch invariant and not compiled: `unsupported_reason`). Returns logits [sum(len(d) + 1), vocab], row r's at
    offsets(drafts)[r] + j for j = 0..len(drafts[r]) (j: the logits after its j-th draft token).
    Leaves every row's cache length at L + len(drafts[r]) + 1; `accept` rolls it back."""
    cache = batch.cache
    real = len(batch)
    device = cache.device
    before = cache.lengths
    counts = [len(d) + 1 for d in drafts]
    after = [b + c for b, c in zip(before, counts, strict=True)]
    cache.grow(after)
    total = sum(counts)
    multiple = options.row_multiple(model)
    n = padded_rows(total, multiple)
    pending = batch.next_ids.tolist()
    ids = torch.zeros(n, dtype=torch.long, device=device)
    ids[:total] = torch.tensor([t for r in range(real) for t in (pending[r], *drafts[r])], device=device)
    positions = torch.zeros(n, dtype=torch.long, device=device)
    columns = [b + j for b, c in zip(before, counts, strict=True) for j in range(c)]
    positions[:total] = torch.tensor(columns)
    slots = cache.slots([r for r in range(real) for _ in range(counts[r])], columns)
    starts = offsets(drafts)
    # Per draft offset j: the rows that have one (None: all), their rows in this step and their
    # key counts.
    steps: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    for j in range(max(counts)):
        have = [r for r in range(real) if counts[r] > j]
        subset = None if len(have) == real else torch.tensor(have, device=device)
        steps.append(
            (
                subset,
                torch.tensor([starts[r] + j for r in have], device=device),
                torch.tensor([before[r] + j + 1 for r in have], device=device),
            )
        )
    width = chunk_width(max(after))
    pool = cache.pool
    kernel = paged_kernel(pool.kv[0], pool.head_dim)
    if kernel is not None:
        # The paged kernel takes a table and a length per query: every (row, offset) query in one
        # call, each computed exactly as the decode step of that length computes it.
        query_rows = torch.tensor([r for r in range(real) for _ in range(counts[r])], device=device)
        tables = cache.page_table(list(range(real)), width).index_select(0, query_rows)
        lengths = torch.tensor([c + 1 for c in columns], device=device)

        def paged_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer, slots, k[:total], v[:total])
            o = paged_decode_attention(kernel, q[:total], pool.kv[layer], tables, lengths, q.shape[2] ** -0.5)
            out = q.new_zeros((q.shape[0], q.shape[1] * q.shape[2]))
            out[:total] = o.reshape(total, -1)
            return out

        lora = LoraRows.build(model, [s.adapter for s in batch.seqs], counts, multiple)
        logits = model.head(model.forward(ids, positions, paged_attend, lora))
        cache.lengths = after
        return logits[:total]
    index = cache.gather_index(list(range(real)), width)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.write(layer, slots, k[:total], v[:total])
        keys, values = cache.gather(layer, index, real, width)  # [real, kv_heads, width, dim]
        heads, dim = q.shape[1], q.shape[2]
        out = q.new_zeros((q.shape[0], heads * dim))
        for subset, at, lengths in steps:
            k_rows, v_rows = keys, values
            if subset is not None:  # rows without a draft this far are left out
                k_rows, v_rows = keys.index_select(0, subset), values.index_select(0, subset)
            o = decode_attention(q.index_select(0, at), k_rows, v_rows, lengths, dim**-0.5, width)
            out[at] = o.reshape(at.shape[0], heads * dim)
        return out

    lora = LoraRows.build(model, [s.adapter for s in batch.seqs], counts, multiple)
    logits = model.head(model.forward(ids, positions, attend, lora))
    cache.lengths = after
    return logits[:total]


def offsets(drafts: Seq[Seq[int]]) -> list[int]:
    """Where each row's logits start in `verify`'s output."""
    out, start = [], 0
    for d in drafts:
        out.append(start)
        start += len(d) + 1
    return out


# emit(rows, logits [len(rows), vocab]) -> per row the token chosen and emitted, or None when the
# row has left (finished or failed); the runner's one-token step (BatchRunner._emit: sample, report to the scheduler).
Emit = Callable[[list[int], torch.Tensor], list[int | None]]


def accept(
    batch: CompactBatch, drafts: list[list[int]], logits: torch.Tensor, emit: Emit
) -> tuple[list[int], list[int]]:
    """Choose tokens offset by offset from `verify`'s logits, as long as each row's chosen token
    equals its draft; roll back the rest. Returns the rows that go on and each row's number of draft
    tokens accepted. `batch.next_ids` becomes each row's last chosen token."""
    real = len(batch)
    starts = offsets(drafts)
    counts = [len(d) + 1 for d in drafts]
    emitted = [0] * real
    last = [0] * real
    gone = [False] * real
    accepted = [0] * real
    going = list(range(real))
    for j in range(max(counts)):
        if not going:
            break
        index = torch.tensor([starts[r] + j for r in going], device=logits.device)
        chosen = emit(going, logits.index_select(0, index))
        still = []
        for r, token in zip(going, chosen, strict=True):
            emitted[r] += 1
            if token is None:
                gone[r] = True
                continue
            last[r] = token
            if j < len(drafts[r]) and token == drafts[r][j]:
                accepted[r] += 1
                still.append(r)
        going = still
    cache = batch.cache
    lengths = list(cache.lengths)
    for r in range(real):
        if gone[r]:
            continue
        keep = lengths[r] - counts[r] + emitted[r]
        cache.zero(r, keep, lengths[r])  # roll back the rejected drafts' keys/values
        lengths[r] = keep
    cache.lengths = lengths
    batch.set_next(last)
    return [r for r in range(real) if not gone[r]], accepted
