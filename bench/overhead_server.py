"""`textgen serve` with its decode steps timed: the server that `bench.overhead` measures.

    python -m bench.overhead_server --model DIR --port N ...   (the flags of `textgen serve`)

Wraps, in this process only, the engine's decode iteration (`Engine._decode`, or the Runner's
`_decode` after the Scheduler/Runner split), the forward (`CompactBatch.decode` / `Batch.decode`)
and the sampler (`choose` where the iteration calls it), and
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

import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
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


def _iteration_methods() -> tuple[list[tuple[type, str]], ModuleType]:
    """The methods that run one decode iteration, and the module whose `choose` they call: the
    Runner's `_decode` after the Scheduler/Runner split (app/engine/runner/runner.py), else the engine's."""
    try:
        runner = importlib.import_module("app.engine.runner.runner")
        importlib.import_module("app.engine.load.runners")  # imports every runner class
    except ImportError:
        from app.engine.core import scheduler

        return [(scheduler.Engine, "_decode")], scheduler
    classes: list[type] = [runner.BatchRunner]
    for cls in classes:
        classes.extend(cls.__subclasses__())
    return [(c, "_decode") for c in classes if "_decode" in vars(c)], runner


def instrument() -> None:
    """Patch the engine's decode iteration, forward and sampler to record STEPS."""
    from app.engine.runner.batch import Batch
    from app.engine.runner.compact_batch import CompactBatch

    methods, sampler_module = _iteration_methods()
    depth = 0  # a subclass's _decode may call its base's: only the outermost call is one iteration

    def timed(decode: Callable[..., Any]) -> Callable[..., Any]:
        def timed_decode(self: Any, batch: Any, *args: Any) -> None:
            global _current
            nonlocal depth
            depth += 1
            if depth == 1:
                _current = [time.perf_counter(), 0.0, 0.0, 0.0, float(len(batch)), time.thread_time(), 0.0]
            try:
                decode(self, batch, *args)
            finally:
                depth -= 1
                if depth == 0 and _current is not None:
                    _current[3] = time.perf_counter()
                    _current[5] = time.thread_time() - _current[5]
                    STEPS.append(_current)
                    _current = None

        return timed_decode

    for cls, name in methods:
        setattr(cls, name, timed(getattr(cls, name)))
    CompactBatch.decode = _timed_part(CompactBatch.decode, 1)  # type: ignore[method-assign]
    Batch.decode = _timed_part(Batch.decode, 1)  # type: ignore[method-assign]
    sampler_module.choose = _timed_part(sampler_module.choose, 2)  # type: ignore[attr-defined]


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
