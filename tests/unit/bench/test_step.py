"""bench.step times both forwards on a model and prints one line per batch size."""

from pathlib import Path

import pytest

from bench.step import main


def test_step_benchmark_runs_both_forwards(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny_gpt2_dir), "--batch", "1,5", "--steps", "2", "--rounds", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch")]
    assert len(lines) == 2
    for line in lines:
        assert "transformers:" in line and "compact:" in line and "compact, not invariant:" in line
