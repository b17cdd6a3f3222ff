"""bench.overhead measures a real instrumented server: per route the server's own step and
iteration times, the client's ITL for streams, and per-thread CPU per token."""

import math
import re
from pathlib import Path

import pytest

from bench.overhead import main


def test_overhead_benchmark_times_steps_inside_the_server(
    stories260k_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(stories260k_dir), "--rounds", "1", "--requests", "1", "--new-tokens", "6", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for route in ("tgi-stream", "openai-stream", "tgi"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"{route}:")]
        # First match per name: the wall-clock fields come before the "engine thread CPU: step" one.
        numbers: dict[str, float] = {}
        for k, v in re.findall(r"(step|iteration|client ITL) (\S+) ms", line):
            numbers.setdefault(k, float(v))
        bookkeeping = float(re.search(r"\(bookkeeping (\S+)\)", line).group(1))  # type: ignore[union-attr]
        # The server's instrumentation saw this route's decode steps (nan when it saw none).
        assert not math.isnan(numbers["step"]) and numbers["step"] > 0, line
        # Each iteration contains its step, so every per-iteration remainder is >= 0 and so is its
        # median. (Medians of steps and of iterations are over different samples and need not order.)
        assert bookkeeping >= 0 and numbers["iteration"] > 0, line
        assert math.isnan(numbers["client ITL"]) == (route == "tgi"), line
    cpu = [line for line in out.splitlines() if "CPU ms/token" in line]
    assert len(cpu) == 3 and all(float(re.search(r"engine (\S+),", c).group(1)) > 0 for c in cpu)  # type: ignore[union-attr]


def test_overhead_benchmark_with_concurrent_clients_keeps_full_batch_iterations(
    stories260k_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two streams at once per route: the kept decode iterations are those that ran both rows.
    argv = ["--model", str(stories260k_dir), "--rounds", "1", "--requests", "1", "--new-tokens", "48"]
    assert main([*argv, "--threads", "1", "--clients", "2", "--routes", "tgi-stream,tgi", "--closed-loop", "4"]) == 0
    out = capsys.readouterr().out
    for route in ("tgi-stream", "tgi"):
        lines = out.splitlines()
        (k,) = [i for i, line in enumerate(lines) if line.startswith(f"{route}:")]
        line, per_token = lines[k], lines[k + 1]
        kept = int(re.search(r"; (\d+) iterations of 2 rows", line).group(1))  # type: ignore[union-attr]
        # 48 tokens per stream: most decode iterations ran both rows (they start together).
        assert 0 < kept <= 47, line
        step = float(re.search(r"step (\S+) ms", line).group(1))  # type: ignore[union-attr]
        per_step = float(re.search(r"per token \(/2\): step (\S+) ms", per_token).group(1))  # type: ignore[union-attr]
        assert step > 0 and abs(per_step - step / 2) < 0.01, (line, per_token)
        bookkeeping = float(re.search(r"\(bookkeeping (\S+)\)", line).group(1))  # type: ignore[union-attr]
        assert bookkeeping >= 0, line
        # The client ITL is every stream's gaps between its token events (streams only).
        itl = float(re.search(r"client ITL (\S+) ms", line).group(1))  # type: ignore[union-attr]
        assert math.isnan(itl) == (route == "tgi"), line
    assert len([line for line in out.splitlines() if line.startswith("   CPU ms/iteration: ")]) == 2
    # The peer benchmark's closed loop: 4 requests over the 2 clients, its ITL beside the iterations.
    (closed,) = [line for line in out.splitlines() if line.startswith("round 1: closed loop (4 requests, 2 clients)")]
    tok_s = float(re.search(r": (\S+) tok/s", closed).group(1))  # type: ignore[union-attr]
    peer_itl = float(re.search(r"peer ITL p50 (\S+) ms", closed).group(1))  # type: ignore[union-attr]
    decoded = int(re.search(r"; (\d+) decode iterations", closed).group(1))  # type: ignore[union-attr]
    assert tok_s > 0 and peer_itl > 0 and decoded >= 47, closed  # two waves of 48 tokens at least
