"""The runner's `ForwardOptions`: the serving choices live there, not on the compact model, so one
wrapped model serves under any options (issue 20: the model files own only the math)."""

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.engine.load.loader import load_model
from app.engine.runner.compact_batch import CompactBatch
from app.engine.runner.forward_options import ForwardOptions
from tests.unit.engine.test_compact import compact, forward_options, prompt_ids, seq


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "stories260k_dir"])
def test_the_loader_builds_the_options_from_its_arguments(request: pytest.FixtureRequest, fixture: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    lm = load_model(str(path), kv_cache_dtype="bfloat16", batch_invariant=False)
    assert forward_options(lm) == ForwardOptions(batch_invariant=False, kv_dtype=torch.bfloat16, compiled=None)
    for flag in ("batch_invariant", "kv_dtype", "compiled"):
        assert not hasattr(compact(lm), flag), f"the compact model carries the serving flag {flag}"
    assert "batch-invariant: false, KV cache bfloat16" in lm.forward_description
    assert load_model(str(path), compact_forward=False).forward_options is None


def test_row_multiple_is_the_weights_when_invariant_else_one(tiny_gpt2_dir: Path) -> None:
    lm = load_model(str(tiny_gpt2_dir), dtype="bfloat16")
    model, options = compact(lm), forward_options(lm)
    assert model.row_multiple > 1  # bf16 GEMMs pad (oneDNN to 2 rows, MKL to 4)
    assert options.row_multiple(model) == model.row_multiple
    assert replace(options, batch_invariant=False).row_multiple(model) == 1


@torch.inference_mode()
def test_one_model_runs_under_other_options(tiny_gpt2_dir: Path) -> None:
    """The same wrapped model, prefilled and decoded with a bf16 KV cache and without batch
    invariance: the pool is in the options' dtype and the logits stay those of the loaded options
    within bf16's rounding of the cached K/V."""
    lm = load_model(str(tiny_gpt2_dir))
    model, options = compact(lm), forward_options(lm)
    assert options.kv_dtype == torch.float32 and options.batch_invariant
    rng = random.Random(5)
    prompts = [prompt_ids(lm, rng, 3, 20) for _ in range(3)]
    other = replace(options, batch_invariant=False, kv_dtype=torch.bfloat16)
    results = []
    for opts in (options, other):
        batch, last, _ = CompactBatch.prefill(model, opts, [seq(lm, p) for p in prompts], all_logits=False)
        assert batch.cache.pool.dtype == opts.kv_dtype
        batch.set_next(last.argmax(-1).tolist())
        results.append((last, batch.decode(model, opts)))
    (last, step), (other_last, other_step) = results
    torch.testing.assert_close(other_last, last, atol=5e-2, rtol=0)
    torch.testing.assert_close(other_step, step, atol=5e-2, rtol=0)
    assert not torch.equal(other_step, step), "a bf16 KV cache must change the decode step's bits"
