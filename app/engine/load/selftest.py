"""A short check at load that the runner that will serve this model works, before /health is 200.

It drives the serving runner (`runners.make_runner`: the compact forward's for GPT-2 and Llama, the
transformers forward's otherwise) through its forward methods. The transformers runner's batch
assumes things about the model that transformers does not promise for every architecture: that it
takes `position_ids`, a 2-D padding mask and `cache=`, that every layer attends to the whole cache,
and that the cache layout is [batch, heads, length, dim]; the compact runner runs textgen's own
forward over the checkpoint's weights (quantized, compiled, in its KV dtype). A model that breaks
one would otherwise fail on the first request, or worse, answer wrongly. So: prefill two
prompts of different lengths together, decode a few steps, let one row leave and another join,
decode again, and compare every row's logits with the same tokens run alone through
`model.generate`. Tokens are fed by teacher forcing (each row is given the tokens `generate`
chose), so a near-tie between two tokens cannot make a healthy model fail.
"""

from typing import Any, cast

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput

from app.engine.core.sequence import Sequence
from app.engine.core.step import Reservation
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.kv.kv_cache import KVAccount
from app.engine.load.loader import LoadedModel, ModelLoadError
from app.engine.load.runners import make_runner
from app.engine.runner.runner import BatchRunner, RunningBatch

_STEPS = 4
_PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman",
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
)


def _reference(model: PreTrainedModel, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and raw next-token logits [steps + 1, vocab] for `ids` alone."""
    lm = cast(GenerationMixin, model)  # AutoModelForCausalLM's classes mix it into PreTrainedModel
    generated = lm.generate(
        torch.tensor([ids], device=model.device),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=model.device),
        max_new_tokens=steps + 1,
        min_new_tokens=steps + 1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    out = cast(GenerateDecoderOnlyOutput, generated)  # what return_dict_in_generate gives a decoder
    assert out.logits is not None  # output_logits=True
    tokens = out.sequences[0, len(ids) :].tolist()
    return tokens, torch.cat([step.float() for step in out.logits])


def _tolerance(logits: torch.Tensor, exact: bool) -> float:
    """Kernel noise between batch shapes is ~1e-6 relative in fp32; a wrong mask, position or
    cache row is off by whole units. Half precision gets a wider margin, and so does int8
    (TEXTGEN_QUANTIZE): that noise can move an activation across an int8 rounding step (0.11 on
    the tests' tiny GPT-2 with int8-dynamic). `exact`: fp32 weights, not quantized (the references
    are upcast to fp32 whatever the model's dtype, so their dtype cannot tell)."""
    relative = 1e-3 if exact else 5e-2
    return relative * max(1.0, float(logits.abs().max()))


def self_test(loaded: LoadedModel) -> None:
    """Raise ModelLoadError naming the model type and what failed, unless the serving runner's batch
    matches `model.generate` for every row through prefill, decode, a row leaving and a row joining."""
    model, tokenizer = loaded.model, loaded.tokenizer
    model_type = getattr(model.config, "model_type", type(model).__name__)
    prompts = [tokenizer(p)["input_ids"][: max(1, loaded.limits.max_input_tokens - 2 * _STEPS - 2)] for p in _PROMPTS]
    prompts = [p or [0] for p in prompts]
    if len(prompts[0]) == len(prompts[1]):
        prompts[1] = prompts[1][: max(1, len(prompts[1]) // 2)]
    step = "running the prompts alone with model.generate"
    try:
        with torch.inference_mode():
            references = [_reference(model, p, 2 * _STEPS) for p in prompts]
            runner: BatchRunner[Any] = make_runner(loaded, KVAccount(1))

            def make(ids: list[int]) -> Sequence:
                request = GenerationRequest(ids, SamplingParams(), StoppingParams(2 * _STEPS + 1), lambda e: None)
                return Sequence(request, tokenizer, frozenset(), frozenset(), 1 << 30, loaded.device)

            fed = [0, 0, 0]  # tokens of its reference each row has been given

            def check(batch: RunningBatch, owners: list[int], logits: torch.Tensor, what: str) -> None:
                for row, owner in enumerate(owners):
                    expected = references[owner][1][fed[owner]]
                    diff = float((logits[row].float() - expected).abs().max())
                    if diff > _tolerance(expected, loaded.dtype == torch.float32 and loaded.quantize == "none"):
                        raise _Mismatch(f"{what}: row {row} (prompt {owner}) differs from model.generate by {diff:.3g}")
                batch.set_next([references[o][0][fed[o]] for o in owners])
                for owner in owners:
                    fed[owner] += 1

            step = "prefilling two prompts of different lengths together"
            seqs = [make(prompts[0]), make(prompts[1])]
            batch, logits, _ = runner.prefill(seqs)
            reservation = Reservation(4, 1 << 40, 0, 1)  # sized to the rows, no spare ones
            runner.reserve(batch, seqs, reservation)
            owners = [0, 1]
            check(batch, owners, logits, "after prefill")
            step = "decoding"
            for _ in range(_STEPS):
                check(batch, owners, runner.decode(batch), "decoding")
            step = "a row leaving the batch"
            batch.filter([1])
            owners = [1]
            check(batch, owners, runner.decode(batch), "after a row left")
            step = "a row joining the batch"
            joining_seq = make(prompts[2])
            joining, logits, _ = runner.prefill([joining_seq])
            check(joining, [2], logits, "prefilling the newcomer")
            runner.reserve(batch, [seqs[1], joining_seq], reservation)
            runner.join(batch, joining)
            owners = [1, 2]
            for _ in range(_STEPS - 1):
                check(batch, owners, runner.decode(batch), "decoding after a row joined")
            runner.free(batch)
    except _Mismatch as exc:
        raise ModelLoadError(
            f"the engine's self-test failed for this '{model_type}' model: {exc}. Its attention does not "
            "follow the batch's padding mask, positions or cache; textgen cannot serve it correctly."
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"the engine's self-test failed for this '{model_type}' model while {step}: "
            f"{type(exc).__name__}: {exc}. textgen's batch needs position_ids, a 2-D attention mask, "
            "a transformers Cache and full attention in every layer."
        ) from exc


class _Mismatch(Exception):
    pass
