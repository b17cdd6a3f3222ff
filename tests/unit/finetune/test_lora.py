"""LoRA: adapters on the right modules; the merged export equals base + adapter."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.finetune.lora import target_modules

from .helpers import run_ok, tiny_args


def test_targets_are_chosen_per_architecture(tiny_gpt2_dir: Path, stories260k_dir: Path) -> None:
    assert target_modules(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)) == ["c_attn"]
    llama = AutoModelForCausalLM.from_pretrained(stories260k_dir)
    assert target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.slow
def test_merged_export_matches_base_plus_adapter(tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path) -> None:
    common = [
        "--lora", "--lora-rank", "4", "--learning-rate", "1e-2", "--max-steps", "10", "--eval-split", "0",
    ]  # fmt: skip
    run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, tmp_path / "merged"), *common])
    run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, tmp_path / "adapter"), *common, "--no-merge"])

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["c_attn"]
    assert adapter_config["fan_in_fan_out"] is True
    assert not (tmp_path / "adapter" / "model.safetensors").exists(), "--no-merge exports the adapter alone"

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    inputs = tok(["the green owl eats 4 honey today."], return_tensors="pt")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), tmp_path / "adapter")(
            **inputs
        ).logits
    assert (merged - base).abs().max() > 1e-2, "the adapter must have changed the model for this test to mean much"
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)
