"""The sampler's batched draw equals torch.multinomial row by row, bit for bit: a seeded request
keeps its tokens (the sampler used to call torch.multinomial per row)."""

from types import SimpleNamespace

import pytest
import torch

from app.engine.sample.sampling import _draw


def _per_row(logprobs: torch.Tensor, rows: list[int], seeds: list[int]) -> list[int]:
    """The previous per-row draw: torch.multinomial on each valid row, argmax otherwise."""
    chosen = logprobs.argmax(dim=-1)
    for row, seed in zip(rows, seeds, strict=True):
        probs = logprobs[row].exp()
        if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
            generator = torch.Generator().manual_seed(seed)
            chosen[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return chosen.tolist()


def _batched(logprobs: torch.Tensor, rows: list[int], seeds: list[int]) -> list[int]:
    seqs = [SimpleNamespace(generator=None) for _ in range(logprobs.shape[0])]
    for row, seed in zip(rows, seeds, strict=True):
        seqs[row].generator = torch.Generator().manual_seed(seed)
    chosen = logprobs.argmax(dim=-1)
    _draw(logprobs, chosen, rows, seqs)  # type: ignore[arg-type]
    return chosen.tolist()


@pytest.mark.parametrize("vocab", [7, 1000, 50257])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_batched_draw_is_multinomial_per_row(vocab: int, temperature: float) -> None:
    torch.manual_seed(vocab)
    logprobs = torch.log_softmax(torch.randn(12, vocab) * 4 / temperature, dim=-1)
    rows = [0, 2, 3, 5, 8, 9, 11]  # the others are greedy rows sharing the batch
    for trial in range(5):
        seeds = [1000 * trial + 17 * row for row in rows]
        assert _batched(logprobs, rows, seeds) == _per_row(logprobs, rows, seeds), (vocab, temperature, trial)


def test_degenerate_rows_keep_their_argmax_and_leave_the_others_alone() -> None:
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(5, 300), dim=-1)
    logprobs[1] = float("nan")  # an overflowed row
    logprobs[3] = float("-inf")  # no mass left
    rows, seeds = [0, 1, 3, 4], [5, 6, 7, 8]
    got = _batched(logprobs, rows, seeds)
    assert got == _per_row(logprobs, rows, seeds)
    assert got[1] == int(logprobs[1].argmax()) and got[3] == int(logprobs[3].argmax())


def test_each_draw_leaves_the_generator_where_multinomial_does() -> None:
    # A request's later steps draw from the same generator: its state after a batched draw must be
    # the state multinomial leaves, or a seeded stream would change from its second token on.
    torch.manual_seed(1)
    rows = [0, 1, 2]
    ours = [torch.Generator().manual_seed(40 + r) for r in rows]
    theirs = [torch.Generator().manual_seed(40 + r) for r in rows]
    seqs = [SimpleNamespace(generator=g) for g in ours]
    for _ in range(4):
        logprobs = torch.log_softmax(torch.randn(3, 2000) * 3, dim=-1)
        chosen = logprobs.argmax(dim=-1)
        _draw(logprobs, chosen, rows, seqs)  # type: ignore[arg-type]
        expected = [int(torch.multinomial(logprobs[r].exp(), 1, generator=theirs[r])[0]) for r in rows]
        assert chosen.tolist() == expected
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs, strict=True))
