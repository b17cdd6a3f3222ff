"""The self-test at load: a model the batch cannot serve is refused before /health is 200."""

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

from app.config import Settings
from app.engine.load.loader import LoadedModel, ModelLoadError, load_model
from app.engine.load.selftest import self_test
from app.service import Service


def test_a_supported_model_passes(tiny_lm: LoadedModel) -> None:
    self_test(tiny_lm)


def test_a_model_the_batch_cannot_serve_is_refused_at_load(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    # Mamba loads as a causal LM, but keeps a recurrent state instead of a KV cache.
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=4))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    load_model(str(tmp_path))  # loading alone succeeds: without the self-test, the first request would fail
    service = Service(Settings(model=str(tmp_path)))
    with pytest.raises(ModelLoadError, match=r"self-test failed for this 'mamba' model while prefilling two prompts"):
        service.load()
    assert service.engine is None


def test_a_bf16_model_passes_with_half_precision_margins(stories260k_dir: Path) -> None:
    # The references are upcast to fp32, so the margin must follow the model's dtype, not theirs
    # (stories260k in bf16 was refused at 0.0625 against the fp32 margin).
    self_test(load_model(str(stories260k_dir), dtype="bfloat16"))


def test_the_self_test_checks_the_runner_that_serves(tiny_gpt2_dir: Path) -> None:
    """GPT-2 is served by the compact runner: a wrong compact forward is refused at load, while the
    same model on the transformers runner (whose forward is intact) passes."""
    lm = load_model(str(tiny_gpt2_dir))
    assert lm.compact is not None
    head = lm.compact.head

    def wrong_head(hidden: torch.Tensor) -> torch.Tensor:
        return head(hidden) * 2 + 5  # what a broken kernel or a bad weight layout would give

    lm.compact.head = wrong_head  # type: ignore[method-assign]
    with pytest.raises(ModelLoadError, match=r"self-test failed for this 'gpt2' model: after prefill: row 0"):
        self_test(lm)
    self_test(dataclasses.replace(lm, compact=None))
