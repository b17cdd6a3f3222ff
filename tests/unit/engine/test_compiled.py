"""TEXTGEN_COMPILE: the compiled decode step against transformers and the eager step, batch
invariance with it, and that warm-up compiles every graph serving needs.

Tolerance against HF logits: the compact forward's (test_compact.TOLERANCE, 1e-4 in fp32):
inductor's fused norms and softmax round differently from eager's, measured ~2e-5 on the tiny
GPT-2 and stories260k. Invariance is exact (`==` on ids and logprobs), as without compile.
"""

import random
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from app.engine.core.types import SamplingParams
from app.engine.load.loader import LoadedModel, ModelLoadError, load_model
from tests.unit.engine import test_compact
from tests.unit.engine.test_compact import assert_alone_equals_batched, prompt_ids, run_engine


@pytest.fixture(scope="module", params=["tiny-gpt2", "stories260k"])
def path(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_gpt2_dir" if request.param == "tiny-gpt2" else "stories260k_dir")


@pytest.fixture(scope="module")
def compiled_lm(path: Path) -> LoadedModel:
    lm = load_model(str(path), compile=True)
    assert lm.forward_options is not None and lm.forward_options.compiled is not None
    assert lm.forward_options.compiled.graphs == ["decode, any rows and KV width"]
    return lm


def compiled_steps(lm: LoadedModel) -> int:
    assert lm.forward_options is not None and lm.forward_options.compiled is not None
    return lm.forward_options.compiled.steps


def test_compiled_logits_match_transformers(compiled_lm: LoadedModel) -> None:
    before = compiled_steps(compiled_lm)
    test_compact.test_logits_match_transformers(compiled_lm)
    assert compiled_steps(compiled_lm) == before + 4, "every decode step ran compiled"


@torch.inference_mode()
def test_greedy_output_is_identical_with_compile_on_and_off(compiled_lm: LoadedModel, path: Path) -> None:
    rng = random.Random(3)
    requests = [(prompt_ids(compiled_lm, rng, 1, 40), SamplingParams(), rng.randint(8, 40)) for _ in range(12)]
    gaps = [rng.choice([0.0, 0.01]) for _ in requests]
    before = compiled_steps(compiled_lm)
    on = run_engine(compiled_lm, requests, gaps)
    assert compiled_steps(compiled_lm) > before
    off = run_engine(load_model(str(path)), requests, gaps)
    assert [ids for ids, _ in on] == [ids for ids, _ in off]
    worst = max(abs(a - b) for (_, x), (_, y) in zip(on, off, strict=True) for a, b in zip(x, y, strict=True))
    assert worst < 1e-4, f"logprobs compile on/off differ by {worst}"


@torch.inference_mode()
def test_compiled_rows_are_bitwise_the_same_alone_and_batched(compiled_lm: LoadedModel) -> None:
    graphs = counters["stats"]["unique_graphs"]
    assert_alone_equals_batched(compiled_lm, 20)
    # Rows 1..20, KV widths of one chunk and more, caches of one row and more: no new graph.
    assert counters["stats"]["unique_graphs"] == graphs, "serving compiled a graph the warm-up did not"


def test_compile_needs_the_compact_forward(tiny_gpt2_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="TEXTGEN_COMPILE=true needs the compact forward"):
        load_model(str(tiny_gpt2_dir), compact_forward=False, compile=True)


@torch.inference_mode()
def test_bf16_compiled_rows_are_bitwise_the_same_alone_and_batched(tiny_gpt2_dir: Path) -> None:
    """bf16 GEMMs need no row padding, so a request alone is one row: torch specialized a graph for
    it whose bits differed from the batched graph's (1 of 8 requests' tokens, logprobs by up to 1.6),
    until compiled steps were padded to 2+ rows. 20 requests as in test_compact."""
    lm = load_model(str(tiny_gpt2_dir), dtype="bfloat16", kv_cache_dtype="bfloat16", compile=True)
    assert lm.forward_options is not None and lm.forward_options.compiled is not None
    assert lm.forward_options.compiled.graphs == ["decode, any rows and KV width"]
    graphs = counters["stats"]["unique_graphs"]
    assert_alone_equals_batched(lm, 20)
    assert counters["stats"]["unique_graphs"] == graphs, "serving compiled a graph the warm-up did not"
