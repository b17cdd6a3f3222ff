"""app/own_thread.py: work runs on a thread that ends, and takes its OpenMP team with it."""

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from app.own_thread import on_own_thread


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_op() -> str:
    torch.randn(4_000_000).sum()  # big enough for torch to run it on its OpenMP team
    return threading.current_thread().name


def test_returns_the_result_from_a_thread_that_has_ended() -> None:
    async def main() -> None:
        before = {t.ident for t in threading.enumerate()}
        assert await on_own_thread(_parallel_op, name="probe") == "probe"
        assert {t.ident for t in threading.enumerate()} == before

    asyncio.run(main())


def test_raises_the_exception() -> None:
    def boom() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        asyncio.run(on_own_thread(boom))


_COUNT_THREADS = """
import asyncio, os, torch
from app.own_thread import on_own_thread

def threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    torch.randn(4_000_000).sum()

parallel_op()  # the main thread's own team, once, so it is not counted below

async def settled(start):
    # An ended thread (and its OpenMP workers) can stay listed for a moment after the result is
    # handed back, longer on a busy machine: wait, bounded, for the count to come back.
    for _ in range(50):
        if threads() <= start:
            break
        await asyncio.sleep(0.1)
    return threads()

async def main():
    start = threads()
    await on_own_thread(parallel_op)
    after_own = await settled(start)
    await asyncio.to_thread(parallel_op)
    print(after_own - start, threads() - after_own)

asyncio.run(main())
"""


@pytest.mark.skipif(
    torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2+ torch threads and /proc"
)
def test_leaves_no_openmp_team_behind_where_a_pool_thread_does() -> None:
    """The reason the module exists: a pool thread that ran a parallel op keeps an OpenMP worker
    alive (libgomp then stops spinning and the engine's steps slow down); our thread does not.
    Counted in a fresh interpreter: in the test process other tests' threads come and go."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", _COUNT_THREADS], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    own, pool = (int(x) for x in out.stdout.split())
    assert own == 0
    assert pool >= 2, "a pool thread and its OpenMP worker stay (the baseline this guards against)"
