"""bench.step times both forwards on a model and prints one line per batch size."""

import re
from pathlib import Path

import pytest

from bench.step import main


def test_step_benchmark_runs_both_forwards(tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny_gpt2_dir), "--batch", "1,5", "--steps", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("batch")]
    assert len(lines) == 2
    for line in lines:
        assert "transformers:" in line and "compact:" in line and "compact-not-invariant:" in line
    prefills = [line for line in out if line.startswith("prefill")]
    assert [line.split()[1] for line in prefills] == ["1", "5"]
    assert all(re.search(r" compact:\s+[\d.]+ ms", line) for line in prefills)


def test_step_benchmark_times_a_quantized_mode_against_fp32(
    tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_gpt2_dir), "--batch", "2", "--steps", "2", "--rounds", "1"]
    assert main([*argv, "--quantize", "int8-dynamic", "--paths", "compact-fp32,compact"]) == 0
    out = capsys.readouterr().out
    assert "quantize int8-dynamic" in out
    (line,) = [line for line in out.splitlines() if line.startswith("batch")]
    assert line.index("compact-fp32:") < line.index(" compact:") and "transformers:" not in line


def test_step_benchmark_adds_a_path_per_further_quantize_mode(
    tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_gpt2_dir), "--batch", "2", "--steps", "2", "--rounds", "1"]
    paths = "compact-fp32,compact,compact-int4-weight-only"
    assert main([*argv, "--quantize", "int8-weight-only,int4-weight-only", "--paths", paths]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch")]
    assert "compact-fp32:" in line and " compact:" in line and "compact-int4-weight-only:" in line
    with pytest.raises(SystemExit):
        main([*argv, "--quantize", "int3"])
