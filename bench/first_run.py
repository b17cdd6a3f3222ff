"""First-run time: from starting the server with no demo model on disk (as the first `make run` after
the install does) to the first answer from POST /generate. A script, not a timed test.

    python -m bench.first_run                       # `python -m app.cli serve` with this interpreter
    python -m bench.first_run --command "make run"  # on a fresh clone, after `make install`

The demo model is built into a new, empty XDG_CACHE_HOME (`--cache DIR` keeps it), so every run is a
real first run. Prints one JSON object, then its headline in words: seconds until the port listens,
until /health reports the build, until the build ended (/health left "building"), and until
/generate answered (the first-run time); the CPU seconds the server and its build child used; and
the machine's load average, since on a shared machine that dominates the result.
"""

import argparse
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(command: list[str], timeout: float, cache: Path | None = None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    marks: dict[str, float | None] = {"listening_s": None, "building_s": None, "built_s": None, "answered_s": None}
    with tempfile.TemporaryDirectory(prefix="textgen-first-run-") as tmp:
        cache = cache or Path(tmp)
        if (cache / "textgen" / "demo-model").exists():
            raise SystemExit(f"{cache}/textgen/demo-model exists: this would not be a first run")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
        env.update(XDG_CACHE_HOME=str(cache), TEXTGEN_PORT=str(port), TEXTGEN_HOST="127.0.0.1", HF_HUB_OFFLINE="1")
        log_path = Path(tmp) / "serve.log"
        load_before = os.getloadavg()
        cpu_before = _children_cpu_s()
        started = time.monotonic()
        with log_path.open("w") as log:
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            while time.monotonic() - started < timeout:
                if process.poll() is not None:
                    raise SystemExit(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                now = time.monotonic() - started
                try:
                    health = httpx.get(url + "/health", timeout=5)
                except httpx.HTTPError:
                    time.sleep(0.2)
                    continue
                marks["listening_s"] = marks["listening_s"] or now
                building = health.status_code == 503 and health.json().get("status") == "building"
                if building and marks["building_s"] is None:
                    marks["building_s"] = now
                if not building and marks["building_s"] is not None and marks["built_s"] is None:
                    marks["built_s"] = now
                if health.status_code == 200:
                    r = httpx.post(url + "/generate", json={"inputs": "The list"}, timeout=60)
                    if r.status_code == 200:
                        marks["answered_s"] = time.monotonic() - started
                        break
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        cpu_s = _children_cpu_s() - cpu_before
        if marks["answered_s"] is None:
            raise SystemExit(f"no answer within {timeout} s:\n{log_path.read_text()[-3000:]}")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command),
        **{k: None if v is None else round(v, 1) for k, v in marks.items()},
        # CPU time of the server and its build child: what the run cost, whatever else shares the
        # machine (on two idle cores the wall time is between cpu_s / 2 and cpu_s).
        "cpu_s": round(cpu_s, 1),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def summary(result: dict) -> str:
    """The headline in words, under the JSON: the first-run time and how busy the machine was."""
    load = result["load_average_before"][0], result["load_average_after"][0]
    return (
        f"first run: /generate answered {result['answered_s']} s after start "
        f"(listening {result['listening_s']} s, build done {result['built_s']} s); "
        f"{result['cpu_s']} CPU-s on {result['cpus']} cores, 1-min load average {load[0]} before, {load[1]} after"
        " (a quiet machine is near 0)"
    )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", help="Server command (default: this Python's `-m app.cli serve`).")
    parser.add_argument("--timeout", type=float, default=1800, help="Give up after this many seconds.")
    parser.add_argument(
        "--cache", type=Path, help="XDG_CACHE_HOME to build into and keep (default: a temporary one, deleted)."
    )
    args = parser.parse_args(argv)
    command = shlex.split(args.command) if args.command else [sys.executable, "-m", "app.cli", "serve"]
    result = measure(command, args.timeout, args.cache)
    print(json.dumps(result), flush=True)
    print(summary(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
