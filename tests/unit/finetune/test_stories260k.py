"""A real trained model (TinyStories Llama) fine-tuned on text from another domain."""

import re
from pathlib import Path

import pytest

from app.finetune.tokenizer import python_docs_corpus

from .helpers import run_ok


def docs_lines(n: int) -> list[str]:
    """Python reference prose: far from the children's stories the model was trained on."""
    text = "\n".join(python_docs_corpus()[:20])
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if len(line) > 30 and re.match(r"[A-Z]", line)][:n]


@pytest.mark.slow
def test_stories260k_learns_a_new_domain(tmp_path: Path, stories260k_dir: Path) -> None:
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(docs_lines(300)) + "\n", encoding="utf-8")
    metrics = run_ok([
        "--model", str(stories260k_dir), "--data", str(data), "--output", str(tmp_path / "out"),
        "--block-size", "128", "--batch-size", "8", "--learning-rate", "2e-3", "--max-steps", "60",
        "--eval-split", "0.1", "--save-steps", "1000",
    ])  # fmt: skip
    before, after = float(metrics["eval_perplexity_before"]), float(metrics["eval_perplexity_after"])
    assert after < 0.6 * before, (before, after)
