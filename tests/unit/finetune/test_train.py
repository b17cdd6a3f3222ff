"""A real fine-tune of the tiny fixture model: perplexity drops, and the export loads and generates."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import app

from .helpers import read_json, run_ok, tiny_args


@pytest.mark.slow
def test_finetune_drops_held_out_perplexity_and_exports_a_loadable_model(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path
) -> None:
    output = tmp_path / "out"
    extra = ["--max-steps", "60", "--learning-rate", "1e-2", "--eval-split", "0.1"]
    metrics = run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, output), *extra])

    before, after = metrics["eval_perplexity_before"], metrics["eval_perplexity_after"]
    assert isinstance(before, float) and isinstance(after, float)
    # The grammar has a few bits per word; the untrained model is far from it (and very peaked).
    assert after < before / 100, (before, after)
    assert after < 15, after
    assert metrics["global_step"] == 60
    assert metrics["train_tokens"] > 0 and metrics["eval_tokens"] > 0
    assert metrics["train_tokens"] + metrics["eval_tokens"] >= metrics["train_target_tokens"]

    manifest = read_json(output / "manifest.json")
    assert manifest["base_model"] == str(tiny_gpt2_dir)
    assert manifest["textgen_version"] == app.__version__
    assert len(str(manifest["data_sha256"])) == 64
    assert manifest["metrics"] == metrics
    assert not (output / "checkpoints").exists(), "checkpoints are removed after a successful export"

    tok = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    assert json.loads((output / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    ids = model.generate(**tok("the red", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert ids.shape[1] > len(tok("the red")["input_ids"])


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path) -> None:
    runs = [
        run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, tmp_path / name), "--max-steps", "6", "--seed", seed])
        for name, seed in (("a", "1"), ("b", "1"), ("c", "2"))
    ]
    assert runs[0]["final_train_loss"] == runs[1]["final_train_loss"]
    assert runs[0]["final_train_loss"] != runs[2]["final_train_loss"]
    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / n).lm_head.weight for n in "ab"]
    assert torch.equal(weights[0], weights[1])


@pytest.mark.slow
def test_from_scratch_trains_a_tokenizer_and_a_new_model(tmp_path: Path, corpus_txt: Path) -> None:
    output = tmp_path / "scratch"
    metrics = run_ok([
        "--from-scratch", "tiny", "--vocab-size", "300", "--data", str(corpus_txt), "--output", str(output),
        "--block-size", "64", "--max-steps", "40", "--batch-size", "8", "--learning-rate", "1e-2",
        "--save-steps", "1000",
    ])  # fmt: skip
    assert metrics["eval_perplexity_after"] < metrics["eval_perplexity_before"] / 5
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == 64
    assert len(AutoTokenizer.from_pretrained(output)) <= 300
    assert read_json(output / "manifest.json")["from_scratch"] == "tiny"


@pytest.mark.slow
def test_early_stopping_stops_on_eval_loss_and_exports_the_best(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path
) -> None:
    output = tmp_path / "early"
    extra = ["--max-steps", "100", "--learning-rate", "3e-2", "--eval-split", "0.1", "--save-steps", "2",
             "--early-stopping-patience", "2", "--keep-checkpoints"]  # fmt: skip
    metrics = run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, output), *extra])
    assert metrics["global_step"] < 100, "this learning rate plateaus, so patience runs out"

    last = max((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = read_json(last / "trainer_state.json")
    evals = [entry["eval_perplexity"] for entry in state["log_history"] if "eval_perplexity" in entry]
    assert metrics["eval_perplexity_after"] == pytest.approx(min(evals), rel=1e-6)
    best = Path(str(state["best_model_checkpoint"]))
    assert best.parent == output / "checkpoints" and best.exists()


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_and_accumulation(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path
) -> None:
    extra = ["--lora", "--gradient-checkpointing", "--grad-accum", "2", "--max-steps", "8",
             "--learning-rate", "1e-2", "--eval-split", "0.1"]  # fmt: skip
    metrics = run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, tmp_path / "gc"), *extra])
    assert metrics["global_step"] == 8
    assert metrics["eval_perplexity_after"] < metrics["eval_perplexity_before"]
