"""Per-row sampling inside one batch."""

import torch

from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel
from app.engine.sample.sampling import Choice, SamplingState, choose


def seq(
    lm: LoadedModel, sampling: SamplingParams, min_new: int = 0, eos: int | None = None, **stopping: object
) -> Sequence:
    tok = lm.tokenizer
    request = GenerationRequest([5, 6, 7], sampling, StoppingParams(20, min_new, **stopping), lambda e: None)
    eos_ids = frozenset([tok.eos_token_id if eos is None else eos])
    return Sequence(request, tok, eos_ids, frozenset(), 256, torch.device("cpu"))


def pick(x: torch.Tensor, seqs: list[Sequence]) -> list[Choice]:
    """`choose` with the rows' state built as a batch builds it."""
    return choose(x, seqs, SamplingState.of(seqs))


def logits(rows: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn((rows, vocab), generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_argmax(tiny_lm: LoadedModel) -> None:
    x = logits(3)
    choices = pick(x, [seq(tiny_lm, SamplingParams()) for _ in range(3)])
    assert [c.token_id for c in choices] == x.argmax(-1).tolist()
    for row, c in enumerate(choices):
        assert abs(c.logprob - torch.log_softmax(x[row], -1)[c.token_id].item()) < 1e-5


def test_seeded_rows_do_not_depend_on_neighbours(tiny_lm: LoadedModel) -> None:
    params = SamplingParams(do_sample=True, temperature=1.5, seed=7)
    x = logits(4)
    alone = [pick(x[1:2], [seq(tiny_lm, params)])[0].token_id for _ in range(1)]
    mixed_rows = [
        seq(tiny_lm, SamplingParams()),
        seq(tiny_lm, params),
        seq(tiny_lm, SamplingParams(do_sample=True, top_p=0.5, seed=3)),
        seq(tiny_lm, SamplingParams(do_sample=True, top_k=5)),
    ]
    mixed = pick(x, mixed_rows)
    assert mixed[1].token_id == alone[0]


def test_seeded_sequence_of_draws_is_reproducible(tiny_lm: LoadedModel) -> None:
    params = SamplingParams(do_sample=True, seed=11)
    a, b = seq(tiny_lm, params), seq(tiny_lm, params)
    x = logits(1) / 3  # flat enough that draws vary
    draws_a = [pick(x, [a])[0].token_id for _ in range(20)]
    draws_b = [pick(x, [b])[0].token_id for _ in range(20)]
    assert draws_a == draws_b and len(set(draws_a)) > 1


def test_top_k_one_is_greedy_and_min_new_blocks_eos(tiny_lm: LoadedModel) -> None:
    x = logits(2)
    top1 = pick(x, [seq(tiny_lm, SamplingParams(do_sample=True, top_k=1, seed=1))] * 2)
    assert [c.token_id for c in top1] == x.argmax(-1).tolist()
    eos = int(x[0].argmax())
    blocked = pick(x[:1].clone(), [seq(tiny_lm, SamplingParams(), min_new=5, eos=eos)])
    assert blocked[0].token_id != eos
    # vLLM's stop_token_ids are held back by min_tokens like EOS.
    held = pick(x[:1].clone(), [seq(tiny_lm, SamplingParams(), min_new=5, stop_token_ids=(eos,))])
    assert held[0].token_id != eos


def test_repetition_penalty_discourages_seen_tokens(tiny_lm: LoadedModel) -> None:
    x = torch.zeros((1, 64))
    x[0, 6] = 2.0  # token 6 is in the prompt [5, 6, 7]
    x[0, 9] = 1.5
    assert pick(x.clone(), [seq(tiny_lm, SamplingParams())])[0].token_id == 6
    penalised = pick(x.clone(), [seq(tiny_lm, SamplingParams(repetition_penalty=2.0))])
    assert penalised[0].token_id == 9


def test_top_logprobs(tiny_lm: LoadedModel) -> None:
    x = logits(1)
    c = pick(x, [seq(tiny_lm, SamplingParams(top_logprobs=3))])[0]
    assert c.top is not None and [i for i, _ in c.top] == x[0].topk(3).indices.tolist()


def test_logit_bias_and_min_p(tiny_lm: LoadedModel) -> None:
    x = logits(1)
    low = int(x[0].argmin())
    biased = pick(x.clone(), [seq(tiny_lm, SamplingParams(logit_bias=((low, 100.0),)))])[0]
    assert biased.token_id == low  # OpenAI: +100 makes the token all but certain
    banned = int(x[0].argmax())
    second = int(x[0].topk(2).indices[1])
    assert pick(x.clone(), [seq(tiny_lm, SamplingParams(logit_bias=((banned, -100.0),)))])[0].token_id == second
    # min_p = 1 keeps only the most likely token, so sampling is greedy whatever the seed.
    params = [SamplingParams(do_sample=True, temperature=2.0, min_p=1.0, seed=s) for s in range(5)]
    assert {pick(x.clone(), [seq(tiny_lm, p)])[0].token_id for p in params} == {banned}
    free = [SamplingParams(do_sample=True, temperature=2.0, seed=s) for s in range(20)]
    assert len({pick(x.clone(), [seq(tiny_lm, p)])[0].token_id for p in free}) > 1
