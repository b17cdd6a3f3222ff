"""Choose the next token for every row of a batch, each row with its own sampling settings.

A batch's settings are a `SamplingState`: per-row tensors built once when rows join (from each
request's `SamplingParams`), then filtered and concatenated with the batch as rows leave and
join, as TGI's heterogeneous next-token chooser does. A step reads them; it does not regroup
rows by their settings.

Per row, in this order (as vLLM and transformers): `logit_bias`, penalties, suppressed ids
(`min_new_tokens`), the grammar's mask; then, for sampled rows, the warpers temperature, top-k,
top-p, typical-p and min-p. Each warper runs the same ops as the transformers warper of that name
with the row's own value, so the scores are bitwise those of transformers' warpers (tested
against them in tests/unit/engine/test_sampling_state.py). Then log-softmax, and per sampled row
one draw with the row's own generator (so a seeded request gives the same tokens whatever else
shares the batch), else argmax.

Adding a sampling parameter (docs/design.md, "Adding a sampling parameter"): a field of
`SamplingParams` (app/engine/core/types.py), its column and stage here, and each protocol's
`to_sampling_params`. `SAMPLER_FIELDS` names every field this module reads; a test walks
`SamplingParams` and proves each one changes what `choose` returns.
"""

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from app.engine.core.sequence import Sequence
from app.engine.core.types import SamplingParams

# Every SamplingParams field the sampler reads (tests/unit/engine/test_sampling_fields.py checks
# that this is all of them and that each changes the output).
SAMPLER_FIELDS = frozenset(
    {
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",  # through the row's generator (Sequence)
        "top_logprobs",
    }
)


@dataclass
class Choice:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


def _float(values: list[float]) -> torch.Tensor:
    """[rows, 1] float32: values rounded as transformers' warpers round their Python floats."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


_TOP_K_MAX = 2**31 - 1


class SamplingState:
    """The sampling settings of a batch's rows: [rows, 1] columns (made on the CPU, moved to the
    scores' device when used) and, per warper, the rows it applies to. Built from the rows'
    `SamplingParams` when the batch forms (`of`), and again only when its rows change: `filter`
    and `concat` follow the batch's `filter` and `extend`, `select` gives the rows of a step over
    some of them (speculative decoding's offsets). A change rebuilds the columns from the kept
    rows' params (O(rows) Python, less than indexing each column); a decode step builds nothing.
    Each row's `logit_bias` vector, made at its first step, moves with the row."""

    def __init__(self, params: list[SamplingParams]) -> None:
        self.params = params
        sampled = [p.do_sample for p in params]
        # Columns: each row's value, neutral where the setting is off.
        self.temperature = _float([p.temperature for p in params])
        # A k past the vocabulary keeps every token (the warp clamps k to it); capped here so that any
        # int a client sends fits the column (2**70 once raised in the engine loop and killed it).
        self.top_k = torch.tensor(
            [min(p.top_k, _TOP_K_MAX) if p.top_k is not None and p.top_k > 0 else 0 for p in params]
        )
        # Top-p removes sorted probabilities whose running sum is <= 1 - top_p (in double, as
        # transformers computes it, then float32).
        self.top_p_cut = _float([1 - p.top_p if p.top_p is not None else 0.0 for p in params])
        self.min_p = _float([p.min_p if p.min_p is not None else 0.0 for p in params])
        # Rows each stage applies to.
        self.sampled = [r for r, on in enumerate(sampled) if on]
        self.tempered = [r for r in self.sampled if params[r].temperature != 1.0]
        self.top_k_rows = [r for r in self.sampled if int(self.top_k[r]) > 0]
        self.top_p_rows = [r for r in self.sampled if (p := params[r].top_p) is not None and p < 1.0]
        self.typical_rows = [r for r in self.sampled if (p := params[r].typical_p) is not None and p < 1.0]
        self.min_p_rows = [r for r in self.sampled if (p := params[r].min_p) is not None and p > 0.0]
        self.biased = [r for r, p in enumerate(params) if p.logit_bias]
        self.penalised = [r for r, p in enumerate(params) if _has_penalties(p)]
        self.with_top = [r for r, p in enumerate(params) if p.top_logprobs > 0]
        self._bias: dict[int, torch.Tensor] = {}  # row -> its logit_bias over the vocabulary, made at first use
        # Settings transformers' warpers refuse: the row fails alone when it is sampled.
        self.errors = {r: e for r in self.sampled if (e := _invalid(params[r]))}

    @classmethod
    def of(cls, seqs: Seq[Sequence]) -> "SamplingState":
        return cls([s.request.sampling for s in seqs])

    def __len__(self) -> int:
        return len(self.params)

    def select(self, rows: Seq[int]) -> "SamplingState":
        """The state of rows `rows`, in that order."""
        out = SamplingState([self.params[r] for r in rows])
        out._bias = {new: self._bias[old] for new, old in enumerate(rows) if old in self._bias}
        return out

    def filter(self, keep: Seq[int]) -> "SamplingState":
        """The state once only rows `keep` stay in the batch."""
        return self if len(keep) == len(self) else self.select(keep)

    def concat(self, other: "SamplingState") -> "SamplingState":
        """This state with `other`'s rows appended (rows joining the batch)."""
        out = SamplingState([*self.params, *other.params])
        out._bias = {**self._bias, **{len(self) + r: b for r, b in other._bias.items()}}
        return out

    def bias(self, row: int, vocab: int) -> torch.Tensor:
        """Row `row`'s `logit_bias` as [vocab] float32 (transformers' SequenceBiasLogitsProcessor
        for single tokens: a later duplicate id wins). Raises ValueError for an id outside `vocab`."""
        out = self._bias.get(row)
        if out is None or out.shape[0] != vocab:
            pairs = dict(self.params[row].logit_bias)
            outside = [i for i in pairs if not 0 <= i < vocab]
            if outside:
                raise ValueError(f"logit_bias token ids {outside[:5]} are outside the vocabulary ({vocab})")
            out = torch.zeros(vocab, dtype=torch.float)
            out[list(pairs)] = torch.tensor(list(pairs.values()))
            self._bias[row] = out
        return out


def _invalid(params: SamplingParams) -> str | None:
    """Why transformers' warpers would refuse `params` (a sampled row's), or None."""
    if not params.temperature > 0:
        return f"`temperature` has to be a strictly positive float, but is {params.temperature}"
    if params.top_p is not None and params.top_p < 0:
        return f"`top_p` has to be a float in [0, 1], but is {params.top_p}"
    if params.typical_p is not None and not 0 < params.typical_p:
        return f"`typical_p` has to be a float > 0 and < 1, but is {params.typical_p}"
    if params.min_p is not None and not params.min_p <= 1:
        return f"`min_p` has to be a float in [0, 1], but is {params.min_p}"
    return None


def _has_penalties(params: SamplingParams) -> bool:
    return (
        (params.repetition_penalty is not None and params.repetition_penalty != 1.0)
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _apply_penalties(scores: torch.Tensor, seq: Sequence, params: SamplingParams) -> None:
    """Row `scores` [vocab], in place: repetition over prompt + output (transformers'), then
    presence and frequency over the output (OpenAI's). Per row, on the ids it has seen: a
    [rows, vocab] version over the whole batch measured 1.5x (batch 1) to 2.8x (batch 32) slower
    with 300 seen ids per row (GPT-2's vocabulary, 2-core CPU)."""
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        seen = torch.tensor(seq.all_ids(), device=scores.device)
        picked = scores.gather(0, seen)
        penalised = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        scores.scatter_(0, seen, penalised)
    if (params.presence_penalty or params.frequency_penalty) and seq.generated:
        counts = torch.bincount(torch.tensor(seq.generated, device=scores.device), minlength=scores.shape[-1]).to(
            scores.dtype
        )
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(scores.dtype)


def _on_rows(scores: torch.Tensor, rows: list[int], warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """`scores[rows] = warp(scores[rows], index)`, in place on the whole batch when every row is in."""
    index = torch.tensor(rows)
    if len(rows) == scores.shape[0]:
        scores.copy_(warp(scores, index))
    else:
        scores[index] = warp(scores[index], index)


def _top_k(state: SamplingState) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def warp(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        k = state.top_k[index].to(scores.device).clamp(max=scores.shape[-1])
        kth = torch.topk(scores, int(k.max())).values.gather(1, (k - 1)[:, None])
        return scores.masked_fill(scores < kth, float("-inf"))

    return warp


def _top_p(state: SamplingState) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def warp(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= state.top_p_cut[index].to(scores.device)
        remove[..., -1:] = False  # keep at least one token
        return scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))

    return warp


def _typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical-p on one row [1, vocab]: transformers' TypicalLogitsWarper's ops. Run per row, so
    its entropy's elementwise exp never depends on which rows share the step."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=sorted_scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last.view(-1, 1))
    remove[..., :1] = False
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))


def _min_p(state: SamplingState) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def warp(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < state.min_p[index].to(scores.device) * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        return scores.masked_fill(remove, float("-inf"))

    return warp


def choose(
    logits: torch.Tensor,
    seqs: Seq[Sequence],
    state: SamplingState,
    on_mask: Callable[[float], None] | None = None,
) -> list[Choice]:
    """`logits` is [batch, vocab] for the last position of each row of `seqs`, whose settings are
    `state` (same rows, same order). Each row's `top` holds its `top_logprobs` most likely ids
    with their log-probabilities. Rows with a grammar get its allowed-token mask after bias and
    penalties, before the warpers (as vLLM); `on_mask` receives the seconds spent computing this
    step's masks. Raises on a row whose settings cannot be applied (the caller retries row by row)."""
    if state.errors:
        raise ValueError("; ".join(state.errors.values()))
    scores = logits.float()
    vocab = scores.shape[-1]
    for row in state.biased:
        scores[row] += state.bias(row, vocab).to(scores.device)
    for row in state.penalised:
        _apply_penalties(scores[row], seqs[row], state.params[row])
    mask_s = 0.0
    for row, seq in enumerate(seqs):
        suppressed = seq.suppressed_ids
        if suppressed:
            scores[row, suppressed] = float("-inf")
        if seq.matcher is not None:
            start = time.perf_counter()
            allowed = seq.matcher.allowed(vocab, scores.device)
            scores[row].masked_fill_(~allowed, float("-inf"))
            mask_s += time.perf_counter() - start
    if on_mask is not None and mask_s:
        on_mask(mask_s)

    if state.tempered:
        _on_rows(scores, state.tempered, lambda s, index: s / state.temperature[index].to(s.device))
    if state.top_k_rows:
        _on_rows(scores, state.top_k_rows, _top_k(state))
    if state.top_p_rows:
        _on_rows(scores, state.top_p_rows, _top_p(state))
    for row in state.typical_rows:
        mass = state.params[row].typical_p
        assert mass is not None  # typical_rows holds only rows that set it
        scores[row : row + 1] = _typical(scores[row : row + 1], mass)
    if state.min_p_rows:
        _on_rows(scores, state.min_p_rows, _min_p(state))

    # Extreme settings (temperature 1e-30, huge penalties) can overflow; NaN must never win.
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    logprobs = torch.log_softmax(scores, dim=-1)
    chosen = scores.argmax(dim=-1)
    for row in state.sampled:
        probs = logprobs[row].exp()
        if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
            chosen[row] = torch.multinomial(probs, 1, generator=seqs[row].generator)[0]
        # else: the distribution degenerated to a point mass (or worse); argmax is its mode

    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].clamp(min=-1e4).nan_to_num(-1e4).tolist()
    chosen_ids = chosen.tolist()
    choices = [Choice(chosen_ids[row], chosen_lp[row], None) for row in range(len(seqs))]
    for row in state.with_top:
        values, ids = logprobs[row].topk(state.params[row].top_logprobs)
        values = values.clamp(min=-1e4)  # -inf (warped away) is not valid JSON
        choices[row].top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return choices
