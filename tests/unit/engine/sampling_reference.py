"""The sampler as it was before SamplingState (main at bb4ef19's app/engine/sample/sampling.py, with
SamplingParams' removed `warper_key` and `has_penalties` inlined): rows grouped by identical
warper settings through transformers' own logits warpers. The reference that
app/engine/sample/sampling.py must match bitwise (tests/unit/engine/test_sampling_state.py).

Original description: choose the next token for every row of a batch, each row with its own
sampling settings.

Greedy rows without penalties take one vectorised argmax. Penalties are applied per row that
asks for them. Sampled rows are grouped by identical warper settings and go through
transformers' own logits warpers together; each sampled row then draws with its own generator,
so a seeded request gives the same tokens whatever else shares the batch.
"""

import time
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import cast

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from app.engine.core.sequence import Sequence
from app.engine.core.types import SamplingParams


@dataclass
class Choice:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


def _warper_key(p: SamplingParams) -> tuple[float, int | None, float | None, float | None, float | None]:
    return (p.temperature, p.top_k, p.top_p, p.typical_p, p.min_p)


def _has_penalties(p: SamplingParams) -> bool:
    return (
        (p.repetition_penalty is not None and p.repetition_penalty != 1.0)
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
    )


def _warpers(params: SamplingParams) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k is not None and params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.typical_p is not None and params.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(params.typical_p))
    if params.min_p is not None and params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    return warpers


def _apply_logit_bias(scores: torch.Tensor, seq: Sequence) -> None:
    """OpenAI's `logit_bias`: added to the raw logits, before penalties and warpers."""
    bias: list[list[list[int] | float]] = [[[token_id], value] for token_id, value in seq.request.sampling.logit_bias]
    processor = SequenceBiasLogitsProcessor(sequence_bias=bias)
    ids = torch.tensor([seq.all_ids()], device=scores.device)
    scores.copy_(processor(ids, scores[None])[0])


def _apply_penalties(scores: torch.Tensor, seq: Sequence) -> None:
    params = seq.request.sampling
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


def reference_choose(
    logits: torch.Tensor, seqs: Seq[Sequence], on_mask: Callable[[float], None] | None = None
) -> list[Choice]:
    """`logits` is [batch, vocab] for the last position of each row of `seqs`. Each row's
    `top` holds its `top_logprobs` most likely ids with their log-probabilities. Rows with a
    grammar get its allowed-token mask after bias and penalties, before the warpers (as vLLM);
    `on_mask` receives the seconds spent computing this step's masks."""
    scores = logits.float()
    mask_s = 0.0
    for row, seq in enumerate(seqs):
        if seq.request.sampling.logit_bias:
            _apply_logit_bias(scores[row], seq)
        if _has_penalties(seq.request.sampling):
            _apply_penalties(scores[row], seq)
        suppressed = seq.suppressed_ids
        if suppressed:
            scores[row, suppressed] = float("-inf")
        if seq.matcher is not None:
            start = time.perf_counter()
            allowed = seq.matcher.allowed(scores.shape[-1], scores.device)
            scores[row].masked_fill_(~allowed, float("-inf"))
            mask_s += time.perf_counter() - start
    if on_mask is not None and mask_s:
        on_mask(mask_s)

    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, seq in enumerate(seqs):
        if seq.request.sampling.do_sample:
            groups[_warper_key(seq.request.sampling)].append(row)
    for rows in groups.values():
        index = torch.tensor(rows, device=scores.device)
        warpers = _warpers(seqs[rows[0]].request.sampling)
        if warpers:
            # Warpers ignore the ids; HF's signature types them as LongTensor.
            no_ids = cast(torch.LongTensor, torch.zeros((len(rows), 1), dtype=torch.long, device=scores.device))
            scores[index] = warpers(no_ids, scores[index])

    # Extreme settings (temperature 1e-30, huge penalties) can overflow; NaN must never win.
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    logprobs = torch.log_softmax(scores, dim=-1)
    chosen = scores.argmax(dim=-1)
    for rows in groups.values():
        for row in rows:
            probs = logprobs[row].exp()
            if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
                chosen[row] = torch.multinomial(probs, 1, generator=seqs[row].generator)[0]
            # else: the distribution degenerated to a point mass (or worse); argmax is its mode

    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].clamp(min=-1e4).nan_to_num(-1e4).tolist()
    chosen_ids = chosen.tolist()
    choices = []
    for row, seq in enumerate(seqs):
        k = seq.request.sampling.top_logprobs
        top = None
        if k > 0:
            values, ids = logprobs[row].topk(k)
            values = values.clamp(min=-1e4)  # -inf (warped away) is not valid JSON
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        choices.append(Choice(chosen_ids[row], chosen_lp[row], top))
    return choices
