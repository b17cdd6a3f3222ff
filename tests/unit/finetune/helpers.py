"""Inputs and runners shared by the fine-tuning tests (unit and end-to-end)."""

import json
import random
from pathlib import Path

from app.finetune.cli import main

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}  # see conftest.one_thread; for runs in a child process

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog"]
FOODS = ["apples", "bread", "fish", "honey", "rice", "cheese"]


def synthetic_lines(n: int, seed: int = 0) -> list[str]:
    """A tiny grammar: low entropy, unlike anything in the tokenizer's Python-docs training text,
    so a model that learned from it shows a large perplexity drop."""
    rng = random.Random(seed)
    return [
        f"the {rng.choice(COLORS)} {rng.choice(ANIMALS)} eats {rng.randint(2, 9)} {rng.choice(FOODS)} today."
        for _ in range(n)
    ]


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """Settings that train the 2-layer fixture model in a second or two."""
    return [
        "--model", str(model), "--data", str(data), "--output", str(output),
        "--block-size", "64", "--batch-size", "8", "--learning-rate", "3e-3",
        "--logging-steps", "1", "--save-steps", "1000", *extra,
    ]  # fmt: skip


def read_json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))


def run_ok(argv: list[str]) -> dict[str, object]:
    """Runs the CLI in-process; returns metrics.json."""
    assert main(argv) == 0
    output = Path(argv[argv.index("--output") + 1])
    return read_json(output / "metrics.json")
