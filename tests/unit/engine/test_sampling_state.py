"""The per-row sampling state gives bitwise what transformers' warpers gave when rows were grouped
by their settings (tests/unit/engine/sampling_reference.py, the sampler before SamplingState), in
any mix of settings, and follows rows as they join and leave."""

import random

import pytest
import torch

from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel
from app.engine.sample.sampling import Choice, SamplingState, choose
from tests.unit.engine.sampling_reference import reference_choose

VOCAB = 300


def random_params(rng: random.Random, seed: int) -> SamplingParams:
    """A mix of every setting, each on in about half the rows; sampled rows are seeded."""

    def some(value: object) -> object:
        return value if rng.random() < 0.5 else None

    do_sample = rng.random() < 0.7
    bias = tuple((rng.randrange(VOCAB), rng.choice([-100.0, -3.0, 2.5, 100.0])) for _ in range(rng.randrange(3)))
    return SamplingParams(
        do_sample=do_sample,
        temperature=rng.choice([1.0, 0.7, 1.3, 0.05]),
        top_k=some(rng.choice([1, 5, 40, 1000])),  # type: ignore[arg-type]
        top_p=some(rng.choice([0.3, 0.9, 1.0])),  # type: ignore[arg-type]
        typical_p=some(rng.choice([0.5, 0.95])),  # type: ignore[arg-type]
        min_p=some(rng.choice([0.05, 0.3])),  # type: ignore[arg-type]
        repetition_penalty=some(rng.choice([1.3, 0.8])),  # type: ignore[arg-type]
        presence_penalty=rng.choice([0.0, 0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.4]),
        seed=seed,
        top_logprobs=rng.choice([0, 0, 3]),
        logit_bias=bias,
    )


def make_seq(lm: LoadedModel, params: SamplingParams, prompt: list[int], min_new: int = 0) -> Sequence:
    request = GenerationRequest(prompt, params, StoppingParams(50, min_new), lambda e: None)
    return Sequence(request, lm.tokenizer, frozenset([3]), frozenset(), 512, torch.device("cpu"))


def twins(lm: LoadedModel, rng: random.Random, rows: int) -> tuple[list[Sequence], list[Sequence]]:
    """Two identical batches of sequences (same settings, prompts, seeds): one per sampler."""
    a, b = [], []
    for _ in range(rows):
        params = random_params(rng, seed=rng.randrange(2**31))
        prompt = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 8))]
        min_new = rng.choice([0, 0, 2])
        a.append(make_seq(lm, params, prompt, min_new))
        b.append(make_seq(lm, params, prompt, min_new))
    return a, b


def same(new: list[Choice], old: list[Choice]) -> None:
    """Bitwise: ids, logprobs (as float bits) and top candidates."""
    assert [(c.token_id, c.logprob, c.top) for c in new] == [(c.token_id, c.logprob, c.top) for c in old]


@pytest.mark.parametrize("trial", range(10))
def test_mixed_batches_match_transformers_warpers_bitwise(tiny_lm: LoadedModel, trial: int) -> None:
    rng = random.Random(trial)
    rows = rng.choice([1, 3, 8, 17])
    new_seqs, old_seqs = twins(tiny_lm, rng, rows)
    state = SamplingState.of(new_seqs)
    gen = torch.Generator().manual_seed(trial)
    for _ in range(6):  # steps: penalties and min_new_tokens see the tokens chosen so far
        x = torch.randn((rows, VOCAB), generator=gen) * rng.choice([1.0, 4.0])
        new = choose(x.clone(), new_seqs, state)
        old = reference_choose(x.clone(), old_seqs)
        same(new, old)
        for seq_new, seq_old, c in zip(new_seqs, old_seqs, new, strict=True):
            seq_new.append(c.token_id, c.logprob, c.top)
            seq_old.append(c.token_id, c.logprob, c.top)


def test_every_row_alone_gives_its_bits_in_the_batch(tiny_lm: LoadedModel) -> None:
    """Batch invariance of the sampler: a row's choice is the same alone as among any others."""
    rng = random.Random(99)
    batch, _ = twins(tiny_lm, rng, 12)
    alone = [
        make_seq(tiny_lm, s.request.sampling, s.request.prompt_ids, s.request.stopping.min_new_tokens) for s in batch
    ]
    x = torch.randn((12, VOCAB), generator=torch.Generator().manual_seed(5)) * 3
    together = choose(x.clone(), batch, SamplingState.of(batch))
    for row, seq in enumerate(alone):
        same(choose(x[row : row + 1].clone(), [seq], SamplingState.of([seq])), [together[row]])


def test_state_follows_joins_and_leaves(tiny_lm: LoadedModel) -> None:
    """filter/concat/select give the state built from the rows now in the batch, bitwise the same
    choices as the reference sampler on those rows."""
    rng = random.Random(7)
    first, first_ref = twins(tiny_lm, rng, 5)
    joined, joined_ref = twins(tiny_lm, rng, 4)
    state = SamplingState.of(first)
    x = torch.randn((5, VOCAB), generator=torch.Generator().manual_seed(1))
    choose(x, first, state)  # builds the rows' cached logit_bias vectors, which must move along
    keep = [0, 2, 4]
    state = state.filter(keep).concat(SamplingState.of(joined))
    seqs = [first[r] for r in keep] + joined
    refs = [first_ref[r] for r in keep] + joined_ref
    assert state.params == [s.request.sampling for s in seqs]
    rebuilt = SamplingState.of(seqs)
    for name in ("temperature", "top_k", "top_p_cut", "min_p"):
        assert torch.equal(getattr(state, name), getattr(rebuilt, name)), name
    for name in (
        "sampled",
        "tempered",
        "top_k_rows",
        "top_p_rows",
        "typical_rows",
        "min_p_rows",
        "biased",
        "penalised",
    ):
        assert getattr(state, name) == getattr(rebuilt, name), name
    # The reference saw a different first step for its rows: give it the same history.
    for s, r in zip(seqs, refs, strict=True):
        for token in s.generated:
            r.append(token, 0.0, None)
    y = torch.randn((len(seqs), VOCAB), generator=torch.Generator().manual_seed(2)) * 2
    for s, r in zip(seqs, refs, strict=True):  # seeded generators: put the reference's at the same draw
        if s.generator is not None and r.generator is not None:
            r.generator.set_state(s.generator.get_state())
    same(choose(y.clone(), seqs, state), reference_choose(y.clone(), refs))
    picked = [seqs[1], seqs[4]]
    saved = [s.generator.get_state() if s.generator is not None else None for s in picked]
    selected = choose(y[[1, 4]].clone(), picked, state.select([1, 4]))
    for s, g in zip(picked, saved, strict=True):  # the same draws again, from a state built anew
        if s.generator is not None and g is not None:
            s.generator.set_state(g)
    same(selected, choose(y[[1, 4]].clone(), picked, SamplingState.of(picked)))


def test_settings_transformers_refuses_fail_the_call(tiny_lm: LoadedModel) -> None:
    """As transformers' warpers raise: the engine then retries row by row, so only this row fails."""
    bad = make_seq(tiny_lm, SamplingParams(do_sample=True, temperature=0.0, seed=1), [5])
    with pytest.raises(ValueError, match="temperature"):
        choose(torch.zeros((1, VOCAB)), [bad], SamplingState.of([bad]))
    with pytest.raises(ValueError, match="temperature"):
        reference_choose(torch.zeros((1, VOCAB)), [bad])
    outside = make_seq(tiny_lm, SamplingParams(logit_bias=((VOCAB + 1, 1.0),)), [5])
    with pytest.raises(ValueError, match="vocabulary"):
        choose(torch.zeros((1, VOCAB)), [outside], SamplingState.of([outside]))
