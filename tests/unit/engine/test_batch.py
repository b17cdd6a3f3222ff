"""The running batch: rows that join and leave decode exactly as they would alone."""

import torch

from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel
from app.engine.runner.batch import Batch


def seq(lm: LoadedModel, prompt: str) -> Sequence:
    tok = lm.tokenizer
    request = GenerationRequest(tok(prompt)["input_ids"], SamplingParams(), StoppingParams(50), lambda e: None)
    return Sequence(request, tok, frozenset([tok.eos_token_id]), frozenset(), 256, torch.device("cpu"))


def greedy_alone(lm: LoadedModel, prompt: str, n: int) -> list[int]:
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = lm.model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id
        )
    return out[0, ids.shape[1] :].tolist()


@torch.inference_mode()
def test_join_and_leave_between_steps(tiny_lm: LoadedModel) -> None:
    prompts = ["The list", "A much longer prompt about the import statement and modules", "x"]
    model = tiny_lm.model
    produced: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def step_tokens(batch: Batch, logits: torch.Tensor, owners: list[int]) -> None:
        ids = logits.argmax(-1).tolist()
        for owner, i in zip(owners, ids, strict=True):
            produced[owner].append(i)
        batch.set_next(ids)

    batch, logits, _ = Batch.prefill(model, [seq(tiny_lm, prompts[0])], all_logits=False)
    owners = [0]
    step_tokens(batch, logits, owners)
    for _ in range(3):
        step_tokens(batch, batch.decode(model), owners)
    # Two newcomers of different lengths join a batch whose cache is already 4 tokens longer.
    joining, logits, _ = Batch.prefill(model, [seq(tiny_lm, prompts[1]), seq(tiny_lm, prompts[2])], all_logits=False)
    step_tokens(joining, logits, [1, 2])
    batch.extend(joining)
    owners = [0, 1, 2]
    for _ in range(4):
        step_tokens(batch, batch.decode(model), owners)
    # The longest row leaves: padding columns no one needs are cut.
    length_before = batch.length
    batch.filter([0, 2])
    owners = [0, 2]
    assert batch.length < length_before
    for _ in range(3):
        step_tokens(batch, batch.decode(model), owners)

    assert produced[0] == greedy_alone(tiny_lm, prompts[0], len(produced[0]))
    assert produced[1] == greedy_alone(tiny_lm, prompts[1], len(produced[1]))
    assert produced[2] == greedy_alone(tiny_lm, prompts[2], len(produced[2]))


@torch.inference_mode()
def test_random_joins_and_leaves_match_alone(tiny_lm: LoadedModel) -> None:
    """Rows joining (shorter and longer than the cache) and leaving at random steps: every row's
    greedy tokens equal what the model gives that prompt alone. Exercises slab reuse, row moves,
    growing to the left and reallocation."""
    import random

    rng = random.Random(0)
    model = tiny_lm.model
    words = "the list of objects and the class keyword introduces a new definition with its body".split()
    batch: Batch | None = None
    owners: list[int] = []
    prompts: dict[int, str] = {}
    produced: dict[int, list[int]] = {}
    next_owner = 0
    for _step in range(60):
        if batch is not None and len(batch) and rng.random() < 0.3:
            keep = sorted(rng.sample(range(len(batch)), k=rng.randint(0, len(batch) - 1)))
            owners = [owners[i] for i in keep]
            if keep:
                batch.filter(keep)
            else:
                batch = None
        if rng.random() < 0.4 or batch is None:
            count = rng.randint(1, 3)
            new_prompts = [" ".join(rng.choices(words, k=rng.randint(1, 20))) for _ in range(count)]
            joining, logits, _ = Batch.prefill(model, [seq(tiny_lm, p) for p in new_prompts], all_logits=False)
            ids = logits.argmax(-1).tolist()
            joining.set_next(ids)
            for p, i in zip(new_prompts, ids, strict=True):
                prompts[next_owner], produced[next_owner] = p, [i]
                owners.append(next_owner)
                next_owner += 1
            if batch is None:
                batch = joining
            else:
                batch.extend(joining)
        ids = batch.decode(model).argmax(-1).tolist()
        for owner, i in zip(owners, ids, strict=True):
            produced[owner].append(i)
        batch.set_next(ids)
    assert next_owner > 15
    for owner, tokens in produced.items():
        assert tokens == greedy_alone(tiny_lm, prompts[owner], len(tokens)), owner
