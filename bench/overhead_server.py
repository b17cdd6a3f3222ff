"""`textgen serve` with its decode steps timed: the server that `bench.overhead` measures.

    python -m bench.overhead_server --model DIR --port N ...   (the flags of `textgen serve`)

Wraps, in this process only, the engine's decode iteration (`Engine._decode`), the forward
(`CompactBatch.decode` / `Batch.decode`) and the sampler (`choose` as the engine calls it), and
keeps one record per decode iteration, in `time.perf_counter()` seconds (CLOCK_MONOTONIC, so a
client on the same machine can compare its own timestamps with them):
`[start, forward_s, sampler_s, end, rows, cpu_s, step_cpu_s]`: wall times, then the engine thread's
CPU time (`time.thread_time()`) for the whole iteration and for its forward and sampler; wall
`end - start - forward_s - sampler_s` and CPU `cpu_s - step_cpu_s` are the engine's per-token
bookkeeping (detokenize, stop strings, metrics, the event hand-off).

On SIGUSR1 it writes `{"steps": [...], "threads": {...}}` to $TEXTGEN_OVERHEAD_DUMP (atomically),
`threads` naming the native ids of the event loop's thread ("loop"), the engine's ("engine") and
the other Python threads ("python"); any other thread of the process is native (OpenMP workers,
tokenizer threads). Nothing else about the server changes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS: list[list[float]] = []
_current: list[float] | None = None


def _timed_part(fn: Callable[..., Any], slot: int) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if _current is not None:
                _current[slot] += time.perf_counter() - start
                _current[6] += time.thread_time() - cpu

    return wrapper


def instrument() -> None:
    """Patch the engine's decode iteration, forward and sampler to record STEPS."""
    from app.engine import scheduler
    from app.engine.batch import Batch
    from app.engine.compact_batch import CompactBatch

    decode = scheduler.Engine._decode

    def timed_decode(self: Any, batch: Any) -> None:
        global _current
        _current = [time.perf_counter(), 0.0, 0.0, 0.0, float(len(batch)), time.thread_time(), 0.0]
        try:
            decode(self, batch)
        finally:
            _current[3] = time.perf_counter()
            _current[5] = time.thread_time() - _current[5]
            STEPS.append(_current)
            _current = None

    scheduler.Engine._decode = timed_decode  # type: ignore[method-assign]
    CompactBatch.decode = _timed_part(CompactBatch.decode, 1)  # type: ignore[method-assign]
    Batch.decode = _timed_part(Batch.decode, 1)  # type: ignore[method-assign]
    scheduler.choose = _timed_part(scheduler.choose, 2)


def dump(path: Path) -> None:
    threads: dict[str, list[int]] = {"loop": [threading.main_thread().native_id or 0], "engine": [], "python": []}
    for t in threading.enumerate():
        if t is threading.main_thread() or t.native_id is None:
            continue
        threads["engine" if t.name == "textgen-engine" else "python"].append(t.native_id)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"steps": list(STEPS), "threads": threads}))
    tmp.replace(path)


def main() -> int:
    target = os.environ.get("TEXTGEN_OVERHEAD_DUMP")
    if not target:
        print("bench.overhead_server: set TEXTGEN_OVERHEAD_DUMP to the dump file's path", file=sys.stderr)
        return 2
    instrument()
    # Python runs the handler on the main thread (the event loop's), between its bytecodes.
    signal.signal(signal.SIGUSR1, lambda *_: dump(Path(target)))
    from app.cli import main as cli_main

    return cli_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
