"""bench.kernels times one decode step's layer GEMMs per mode and row count."""

import re

import pytest

from bench.kernels import main


def test_kernel_benchmark_prints_a_line_per_mode_and_row_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rows", "1,3", "--modes", "int8,int4,fp32", "--steps", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rows")]
    assert [line.split()[1:3] for line in lines] == [[r, m] for r in ("1", "3") for m in ("int8", "int4", "fp32")]
    megabytes = {m: float(re.search(r"([\d.]+) MB", line).group(1)) for line in lines[:3] for m in [line.split()[2]]}  # type: ignore[union-attr]
    # GPT-2-124M's 48 layer GEMMs: 85M weights, 4 bytes each in fp32, 1 in int8, 0.625 in int4.
    assert megabytes["fp32"] == pytest.approx(340, rel=0.01)
    assert megabytes["int8"] == pytest.approx(85, rel=0.01)
    assert megabytes["int4"] == pytest.approx(53, rel=0.01)
