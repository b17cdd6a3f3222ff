"""Per-token serving overhead: what a served stream adds to the engine's own decode step, measured
inside ONE server process on the same tokens, so machine noise hits both sides alike.

    python -m bench.overhead [--rounds 3] [--requests 2] [--new-tokens 64] [--threads N] [--clients N]
                             [--closed-loop R]
                             [--routes tgi-stream,openai-stream,tgi] [--inprocess] [--server-env K=V ...]

One `bench.overhead_server` (`textgen serve` with its decode iterations timed; GPT-2-124M shape,
random weights, 32-token prompts, greedy, EOS off) serves `--clients` concurrent streams (default
1), each client its own thread and connection; a request is a wave of N concurrent requests
started together, and only the decode iterations that ran all N rows are kept. Each
round runs every route in turn (alternated, so slow drifts of the machine's load hit all alike):
- `tgi-stream`: POST /generate_stream (SSE, pydantic events);
- `openai-stream`: POST /v1/completions with stream=true;
- `tgi`: POST /generate (no stream: the events still cross to the event loop, nothing is sent);
- `openai-stream-sampled` (only when named): openai-stream at temperature 1, every row sampled.
Per route, over the decode iterations of its requests (the server's own clock, CLOCK_MONOTONIC):
- step: forward + sampler wall time, what `bench.step` times in-process (the sampler's own part
  shown beside it);
- iteration: start to start of consecutive decode iterations, i.e. the engine's ITL;
- bookkeeping: the iteration minus the step (detokenize, stop strings, metrics, event hand-off,
  the loop's admission check, and any wait for the GIL or a CPU between them), in wall time and in
  the engine thread's CPU time (`time.thread_time`, robust to the machine's load);
- client ITL: gaps between the stream's token events as the client reads them (streams only);
- CPU per token of each server thread (/proc/PID/task/TID/schedstat: ns on CPU and ns waiting for
  one), grouped as the event loop's thread, the engine's, other Python threads and native threads
  (OpenMP workers), and of the client process; and the event loop's voluntary context switches per
  token (its wake-ups). These cover the whole request (or wave), its prefill included; with N
  clients, `CPU ms/iteration` is that per token times N.
Medians over all rounds' iterations (and tokens). Overhead = client ITL - step. With N > 1 clients
each decode iteration yields N tokens: the times are per iteration, and a line divides the
iteration's parts by N (per token). `--inprocess` also runs `bench.step` (batch N, compact) in its
own process once per round, the issue's reference. `--closed-loop R` also runs, each round, the
peer benchmark's closed loop (bench.clients, R requests over the N clients, /generate_stream) and
prints its ITL p50 (per request (last - first token) / (tokens - 1), as `bench.run` reports it)
beside the server's decode iterations in that time, the ones that also ran a joiner's prefill
listed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.clients import Job, LoadResult, closed_loop, make_client, ours_stream_sender
from bench.model import default_model_dir, ensure_model, make_prompts
from bench.peer_rounds import itl
from bench.servers import Server, free_port

ROUTES = ("tgi-stream", "openai-stream", "tgi")  # the default routes, all greedy
SAMPLED = "openai-stream-sampled"  # on request: openai-stream at OpenAI's default temperature, 1
GROUPS = ("loop", "engine", "python", "native")


def in_process_step_ms(model: Path, steps: int, threads: int | None, batch: int = 1) -> float:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    out = subprocess.run(
        [sys.executable, "-m", "bench.step", "--model", str(model), "--batch", str(batch), "--steps", str(steps)]
        + ["--rounds", "1", "--paths", "compact"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=True,
    ).stdout
    match = re.search(r"compact:\s+([\d.]+) ms/step", out)
    if match is None:
        raise RuntimeError(f"no step time in bench.step's output:\n{out[-2000:]}")
    return float(match.group(1))


def thread_times(pid: int) -> dict[int, tuple[int, int, int]]:
    """Per thread id: (ns on CPU, ns runnable but waiting for a CPU, voluntary context switches)."""
    out: dict[int, tuple[int, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            run, wait, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        switches = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        out[int(tid)] = (run, wait, int(switches.group(1)) if switches else 0)
    return out


@dataclass
class RouteStats:
    steps: list[float] = field(default_factory=list)  # forward + sampler, ms
    sampler: list[float] = field(default_factory=list)  # the sampler's part of the step, ms
    iterations: list[float] = field(default_factory=list)  # start to start, ms
    bookkeeping: list[float] = field(default_factory=list)  # iteration - step, ms
    bookkeeping_cpu: list[float] = field(default_factory=list)  # engine thread CPU outside the step, ms
    step_cpu: list[float] = field(default_factory=list)  # engine thread CPU in the step, ms
    client_itl: list[float] = field(default_factory=list)  # ms
    tokens: int = 0
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys([*GROUPS, "client"], 0.0))  # ms
    waiting: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0.0))  # ms runnable
    loop_wakeups: int = 0
    seconds: float = 0.0  # wall time of the requests


class Measured:
    """The instrumented server, its dump file and its threads."""

    def __init__(self, model: Path, threads: int | None, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        self.dump_path = tmp / f"textgen-overhead-{self.port}.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
        env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TEXTGEN_UI": "false"})
        env["TEXTGEN_OVERHEAD_DUMP"] = str(self.dump_path)
        env["TEXTGEN_SERVED_MODEL_NAME"] = "bench"
        if threads:
            env["TEXTGEN_TORCH_THREADS"] = str(threads)
        env.update(extra_env)
        cmd = [sys.executable, "-m", "bench.overhead_server", "--model", str(model), "--host", "127.0.0.1"]
        log = tmp / f"textgen-overhead-{self.port}.log"
        self.server = Server("textgen", [*cmd, "--port", str(self.port)], self.port, log, env)

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def read(self) -> dict:
        """Ask the server for its records (SIGUSR1) and read them."""
        before = self.dump_path.stat().st_mtime_ns if self.dump_path.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.dump_path.exists() and self.dump_path.stat().st_mtime_ns != before:
                return json.loads(self.dump_path.read_text())
            time.sleep(0.02)
        raise RuntimeError(f"no dump from the server at {self.dump_path}")


def _request(client: httpx.Client, url: str, route: str, prompt: str, new_tokens: int) -> list[float]:
    """Run one request; returns the client's perf_counter times of its token events (streams).
    Raises httpx.HTTPStatusError."""
    times: list[float] = []
    body: dict[str, object]
    if route == "tgi":
        body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
        client.post(f"{url}/generate", json=body).raise_for_status()
        return times
    if route == "tgi-stream":
        path = "/generate_stream"
        body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
    else:
        path = "/v1/completions"
        # temperature 0: greedy like the other routes (OpenAI's default, 1, samples every row).
        body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens}
        body.update(stream=True, temperature=1.0 if route == SAMPLED else 0.0)
    with client.stream("POST", f"{url}{path}", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                times.append(time.perf_counter())
    return times


def _group(tid: int, threads: dict[str, list[int]]) -> str:
    for name in ("loop", "engine", "python"):
        if tid in threads[name]:
            return name
    return "native"


def _wave(clients: list[httpx.Client], url: str, route: str, prompts: list[str], new_tokens: int) -> list[list[float]]:
    """One request per client, all at once (one thread each, started together); per client the
    times of its token events. One client runs on the calling thread."""
    if len(clients) == 1:
        return [_request(clients[0], url, route, prompts[0], new_tokens)]
    times: list[list[float]] = [[] for _ in clients]
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients))

    def one(k: int) -> None:
        try:
            start.wait(timeout=120)
            times[k] = _request(clients[k], url, route, prompts[k], new_tokens)
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"{route}: a client failed or hung: {errors[:1]}")
    return times


def run_route(
    measured: Measured,
    clients: list[httpx.Client],
    route: str,
    prompts: list[str],
    new_tokens: int,
    stats: RouteStats,
) -> None:
    """`prompts` in waves of len(clients) concurrent requests; keeps the decode iterations that ran
    one row per client."""
    url = measured.server.base_url
    n = len(clients)
    for first in range(0, len(prompts) - n + 1, n):
        before, cpu_before = thread_times(measured.pid), time.process_time()
        start = time.perf_counter()
        events = _wave(clients, url, route, prompts[first : first + n], new_tokens)
        end = time.perf_counter()
        after, cpu_after = thread_times(measured.pid), time.process_time()
        dump = measured.read()
        recorded = [s for s in dump["steps"] if start <= s[0] <= end]
        steps = [s for s in recorded if s[4] == n]
        # Iterations: consecutive recorded decode iterations that both ran all n rows.
        for a, b in zip(recorded, recorded[1:], strict=False):
            if a[4] == n and b[4] == n:
                stats.iterations.append((b[0] - a[0]) * 1000)
                stats.bookkeeping.append((b[0] - a[0] - a[1] - a[2]) * 1000)
        stats.steps.extend((s[1] + s[2]) * 1000 for s in steps)
        stats.sampler.extend(s[2] * 1000 for s in steps)
        stats.step_cpu.extend(s[6] * 1000 for s in steps)
        stats.bookkeeping_cpu.extend((s[5] - s[6]) * 1000 for s in steps)
        for times in events:
            stats.client_itl.extend((b - a) * 1000 for a, b in zip(times, times[1:], strict=False))
        stats.tokens += n * new_tokens
        stats.seconds += end - start
        stats.cpu["client"] += (cpu_after - cpu_before) * 1000
        for tid, (run, wait, switches) in after.items():
            run0, wait0, switches0 = before.get(tid, (0, 0, 0))
            group = _group(tid, dump["threads"])
            stats.cpu[group] += (run - run0) / 1e6
            stats.waiting[group] += (wait - wait0) / 1e6
            if group == "loop":
                stats.loop_wakeups += switches - switches0


def closed_loop_round(measured: Measured, prompts: list[str], clients: int, requests: int, new_tokens: int) -> str:
    """The peer benchmark's closed loop (bench.clients: `clients` asyncio streams of
    /generate_stream, each sending its next request when its last one ends) over `requests`
    requests, and what the server's decode iterations did meanwhile: the peer's ITL (a request's
    mean, bench.peer_rounds.itl) beside the iterations, whose slow ones ran prefills of joiners."""
    jobs = [Job(i, prompts[i % len(prompts)], new_tokens, new_tokens) for i in range(requests)]

    async def run() -> LoadResult:
        async with make_client(clients, 900) as client:
            return await closed_loop(client, ours_stream_sender(measured.server.base_url), jobs, clients, 900)

    start = time.perf_counter()
    result = asyncio.run(run())
    end = time.perf_counter()
    if errors := [r.error for r in result.records if r.error]:
        raise RuntimeError(f"closed loop: {len(errors)} requests failed, e.g. {errors[0]}")
    steps = [s for s in measured.read()["steps"] if start <= s[0] <= end]
    pairs = list(zip(steps, steps[1:], strict=False))
    iterations = [(b[0] - a[0]) * 1000 for a, b in pairs]
    with_prefill = [(b[0] - a[0]) * 1000 for a, b in pairs if b[0] - a[0] - a[1] - a[2] > 0.010]
    itls = [v * 1000 for r in result.records if (v := itl(r)) is not None]
    tokens = sum(r.generated_tokens for r in result.records)
    return (
        f"closed loop ({requests} requests, {clients} clients): {tokens / result.wall_s:.1f} tok/s, "
        f"peer ITL p50 {_p50(itls):.2f} ms; {len(steps)} decode iterations: p50 {_p50(iterations):.2f} ms, "
        f"mean {statistics.fmean(iterations) if iterations else float('nan'):.2f} ms, step p50 "
        f"{_p50([(s[1] + s[2]) * 1000 for s in steps]):.2f} ms; {len(with_prefill)} iterations ran a prefill "
        f"(> 10 ms over their step): {', '.join(f'{v:.0f}' for v in sorted(with_prefill))} ms; rows joined at "
        f"{sorted({int(s[4]) for s in steps} - {clients})}"
    )


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(route: str, s: RouteStats, clients: int = 1) -> str:
    per = max(1, s.tokens)
    step, itl = _p50(s.steps), _p50(s.client_itl)
    iteration, bookkeeping, bookkeeping_cpu = _p50(s.iterations), _p50(s.bookkeeping), _p50(s.bookkeeping_cpu)
    lines = [
        f"{route}: step {step:.2f} ms (sampler {_p50(s.sampler):.2f}), iteration {iteration:.2f} ms "
        f"(bookkeeping {bookkeeping:.2f}), client ITL {itl:.2f} ms; engine thread CPU: step "
        f"{_p50(s.step_cpu):.3f} ms, bookkeeping {bookkeeping_cpu:.3f} ms"
        + (f" -> overhead {itl - step:+.2f} ms" if s.client_itl else "")
        + (f"; {len(s.steps)} iterations of {clients} rows" if clients > 1 else ""),
    ]
    if clients > 1:
        lines.append(
            f"   per token (/{clients}): step {step / clients:.3f} ms, sampler {_p50(s.sampler) / clients:.3f}, "
            f"bookkeeping {bookkeeping / clients:.3f} (engine thread CPU {bookkeeping_cpu / clients:.3f}), "
            f"iteration {iteration / clients:.3f}"
        )
    lines.append(
        "   CPU ms/token: "
        + ", ".join(f"{g} {s.cpu[g] / per:.3f}" for g in [*GROUPS, "client"])
        + f"; runnable-waiting ms/token: loop {s.waiting['loop'] / per:.3f}, engine {s.waiting['engine'] / per:.3f}"
        # uvicorn's main loop ticks 10 times a second whatever the load: not counted.
        + f"; loop wake-ups/token {(s.loop_wakeups - 10 * s.seconds) / per:.2f}"
    )
    if clients > 1:
        lines.append(
            "   CPU ms/iteration: "
            + ", ".join(f"{g} {s.cpu[g] / per * clients:.2f}" for g in [*GROUPS, "client"])
            + f"; loop wake-ups/iteration {(s.loop_wakeups - 10 * s.seconds) / per * clients:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        type=Path,
        help="model directory (default: the bench's GPT-2-124M shape); a tiny "
        "model (stories260k) makes the serving path's own cost per token dominate",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2, help="requests per route per round (per client)")
    p.add_argument("--clients", type=int, default=1, help="concurrent streams, each its own thread and connection")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--inprocess", action="store_true", help="also run bench.step in its own process each round")
    p.add_argument("--server-env", nargs="*", default=[], help="extra server environment, KEY=VALUE")
    p.add_argument(
        "--closed-loop",
        type=int,
        metavar="REQUESTS",
        help="also run, each round, the peer benchmark's closed loop of REQUESTS requests over --clients "
        "streams (the c32 phase: --clients 32 --closed-loop 64)",
    )
    args = p.parse_args(argv)
    routes = args.routes.split(",")
    if unknown := set(routes) - {*ROUTES, SAMPLED}:
        p.error(f"unknown routes {sorted(unknown)}; known: {', '.join([*ROUTES, SAMPLED])}")
    if args.clients < 1:
        p.error("--clients must be >= 1")
    model = args.model or ensure_model(default_model_dir(0)).path
    prompts = [text for text, _ in make_prompts(model, max(args.requests * args.clients, args.closed_loop or 0))]
    measured = Measured(model, args.threads, dict(kv.split("=", 1) for kv in args.server_env))
    stats = {route: RouteStats() for route in routes}
    inprocess: list[float] = []
    closed: list[str] = []
    measured.server.start()
    try:
        measured.server.wait_healthy(600)
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(httpx.Client(timeout=900)) for _ in range(args.clients)]
            for route in routes:  # warm-up (and every client's connection), not counted
                _wave(clients, measured.server.base_url, route, prompts, 8)
            for round_ in range(args.rounds):
                for route in routes:
                    waves = prompts[: args.requests * args.clients]
                    run_route(measured, clients, route, waves, args.new_tokens, stats[route])
                if args.closed_loop:
                    closed.append(closed_loop_round(measured, prompts, args.clients, args.closed_loop, args.new_tokens))
                if args.inprocess:
                    inprocess.append(in_process_step_ms(model, args.new_tokens // 2, args.threads, args.clients))
                print(f"round {round_ + 1} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        measured.server.stop()
    for route in routes:
        print(report(route, stats[route], args.clients))
    for k, line in enumerate(closed):
        print(f"round {k + 1}: {line}")
    if inprocess:
        print(
            f"in-process step at batch {args.clients} (bench.step, own process): best {min(inprocess):.2f} ms, rounds {inprocess}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
