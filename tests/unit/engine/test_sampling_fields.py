"""Every field of SamplingParams changes what the sampler returns, so a new sampling parameter
that the sampler forgets fails here (docs/design.md, "Adding a sampling parameter")."""

import dataclasses
import typing

import pytest
import torch

from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel
from app.engine.sample.sampling import SAMPLER_FIELDS, SamplingState, choose

FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def probe(name: str) -> object:
    """A value of field `name` other than its default, chosen from its type alone, so a new field
    needs no edit here (a type this cannot probe fails, asking for one)."""
    hint = typing.get_type_hints(SamplingParams)[name]
    if hint is bool:
        return True
    if hint in (float, float | None):
        return 0.5
    if hint in (int, int | None):
        return 3
    if hint == tuple[tuple[int, float], ...]:
        return ((1, 5.0),)
    raise AssertionError(f"SamplingParams.{name}: {hint} is a type this test cannot probe; teach probe() one value")


def outputs(lm: LoadedModel, params: SamplingParams) -> list[tuple[int, float, object]]:
    """Five steps of one row over fixed, fairly flat logits, each token appended (so penalties
    see the output): ids, logprobs and top candidates."""
    request = GenerationRequest([5, 6, 7, 5, 6], params, StoppingParams(20), lambda e: None)
    seq = Sequence(request, lm.tokenizer, frozenset([0]), frozenset(), 256, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(5):
        x = torch.randn((1, 64), generator=gen)
        x[0, 5:7] += 1.0  # prompt tokens likely: the repetition penalty has something to act on
        c = choose(x, [seq], SamplingState.of([seq]))[0]
        seq.append(c.token_id, c.logprob, c.top)
        out.append((c.token_id, c.logprob, c.top))
    return out


def test_the_sampler_declares_every_field() -> None:
    assert set(FIELDS) == SAMPLER_FIELDS, (
        "app/engine/sample/sampling.py's SAMPLER_FIELDS must name exactly SamplingParams' fields: "
        f"missing {set(FIELDS) - SAMPLER_FIELDS}, stale {SAMPLER_FIELDS - set(FIELDS)}"
    )


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_changes_the_output(tiny_lm: LoadedModel, name: str) -> None:
    # Sampled and seeded, so the warpers and the seed act; do_sample itself is probed from greedy.
    base = SamplingParams(do_sample=name != "do_sample", seed=1)
    value = probe(name)
    assert value != getattr(base, name)
    assert outputs(tiny_lm, dataclasses.replace(base, **{name: value})) != outputs(tiny_lm, base), (
        f"SamplingParams.{name}={value!r} does not change what choose() returns: app/engine/sample/sampling.py ignores it"
    )
