"""Fixtures for the fine-tuning tests: one-thread torch and a synthetic corpus."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .helpers import synthetic_lines


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small run fastest on one thread; with two on a busy two-core machine, every tiny op
    waits at an OpenMP barrier for a descheduled thread, and a step takes 30 times as long."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus_txt(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(400)) + "\n", encoding="utf-8")
    return path
