"""Small real inputs for the fine-tuning tests: a synthetic corpus with an obvious pattern."""

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.finetune.cli import main


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small run fastest on one thread; with two on a busy two-core machine, every tiny op
    waits at an OpenMP barrier for a descheduled thread, and a step takes 30 times as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}  # the same, for runs in a child process

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


@pytest.fixture
def corpus_txt(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(400)) + "\n", encoding="utf-8")
    return path


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
