"""Prompt/completion data: the loss is on completions only, so the model never learns the prompts."""

import random
from pathlib import Path

import pytest

from .helpers import run_ok, tiny_args, write_jsonl


def _digits(rng: random.Random) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(12))


@pytest.mark.slow
def test_prompts_are_not_learned_but_completions_are(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    """Prompts are digit strings, completions words. Held-out digit text gets much likelier when the
    same records are trained on as plain text, and does not when they are prompt/completion pairs."""
    rng = random.Random(0)
    pairs = [{"prompt": _digits(rng), "completion": " the cat sat on the mat."} for _ in range(150)]
    prompts_only = tmp_path / "digits.txt"
    prompts_only.write_text("\n".join(_digits(rng) for _ in range(60)))
    masked = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    unmasked = write_jsonl(tmp_path / "text.jsonl", [{"text": p["prompt"] + p["completion"]} for p in pairs])

    def digit_perplexity(data: Path, name: str) -> tuple[float, float]:
        extra = ["--max-steps", "30", "--eval-file", str(prompts_only)]
        metrics = run_ok([*tiny_args(tiny_gpt2_dir, data, tmp_path / name), *extra])
        return float(metrics["eval_perplexity_before"]), float(metrics["eval_perplexity_after"])

    before, after_masked = digit_perplexity(masked, "masked")
    _, after_unmasked = digit_perplexity(unmasked, "unmasked")
    assert after_unmasked < before / 10, "the control: training on the digits does teach them"
    assert after_masked > 5 * after_unmasked, (before, after_masked, after_unmasked)
