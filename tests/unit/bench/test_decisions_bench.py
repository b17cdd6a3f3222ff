"""bench.decisions runs end to end on a tiny model and prints one line per client count."""

from pathlib import Path

import pytest

from bench.decisions import main


def test_decisions_benchmark_runs_every_mode(
    tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "decisions.json"
    argv = ["--model", str(tiny_gpt2_dir), "--clients", "1,2", "--requests", "1", "--rounds", "1", "--out", str(out)]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "client(s):" in line]
    assert len(lines) == 2 and all("one-prefill" in line and "completions" in line for line in lines)
    assert out.exists() and "2_clients" in out.read_text()
