"""bench.accuracy prints each mode's KL divergence and top-1 agreement against fp32."""

from pathlib import Path

import pytest

from bench.accuracy import main


def test_accuracy_prints_a_row_per_mode(stories260k_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modes = "int8-weight-only,int4-weight-only"
    assert main(["--model", str(stories260k_dir), "--prompts", "3", "--tokens", "5", "--modes", modes]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(modes.split(","))
    for mean_kl, max_kl, top1 in rows.values():
        assert 0 < float(mean_kl) <= float(max_kl) < 5  # quantized: not bitwise fp32, not noise
        assert 0 < float(top1.rstrip("%")) <= 100


def test_accuracy_refuses_an_unknown_mode() -> None:
    with pytest.raises(SystemExit):
        main(["--modes", "int3"])
