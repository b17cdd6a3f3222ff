"""Per-token serving overhead: served inter-token latency at 1 client against the in-process step.

    python -m bench.overhead [--rounds 3] [--requests 3] [--new-tokens 64] [--threads N]

On the benchmark model (GPT-2-124M shape, random weights, 32-token prompts), alternated in rounds:
- in-process: `python -m bench.step --batch 1 --paths compact` (a decode step with the sampler, no
  engine, no HTTP), in its own process;
- served: one `textgen serve`, one client streaming `/generate_stream` (EOS off), one request at a
  time. Client ITL = the gaps between token events as the client reads them (p50 over all gaps);
  engine ITL = the mean of `textgen_inter_token_latency_seconds` (the engine thread's time between a
  request's tokens: forward, sampler, detokenize, event hand-off).
Overhead = client ITL p50 - in-process step, split into engine (engine ITL - step) and delivery
(client ITL - engine ITL: the event loop, SSE rendering, HTTP). Best round each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.model import default_model_dir, ensure_model, make_prompts
from bench.servers import Server, free_port


def in_process_step_ms(model: Path, steps: int, threads: int | None) -> float:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    out = subprocess.run(
        [sys.executable, "-m", "bench.step", "--model", str(model), "--batch", "1", "--steps", str(steps)]
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


def engine_itl(url: str) -> tuple[float, float]:
    """(sum, count) of textgen_inter_token_latency_seconds."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = float(re.search(r"^textgen_inter_token_latency_seconds_sum (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    count = float(re.search(r"^textgen_inter_token_latency_seconds_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return total, count


def served(model: Path, prompts: list[str], new_tokens: int, threads: int | None) -> tuple[float, float]:
    """(client ITL p50, engine ITL mean), ms."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TEXTGEN_UI": "false"})
    if threads:
        env["TEXTGEN_TORCH_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--host", "127.0.0.1"]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"textgen-overhead-{port}.log"
    server = Server("textgen", [*cmd, "--port", str(port)], port, log, env)
    server.start()
    gaps: list[float] = []
    try:
        server.wait_healthy(600)
        url = server.base_url
        body = {"parameters": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}}
        with httpx.Client(timeout=600) as client:
            client.post(f"{url}/generate", json={**body, "inputs": prompts[0]}).raise_for_status()  # warm-up
            before = engine_itl(url)
            for prompt in prompts:
                last = None
                with client.stream("POST", f"{url}/generate_stream", json={**body, "inputs": prompt}) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data:") or not line[5:].strip():
                            continue
                        now = time.perf_counter()
                        if json.loads(line[5:]).get("token") is None:
                            continue
                        if last is not None:
                            gaps.append(now - last)
                        last = now
            after = engine_itl(url)
    finally:
        server.stop()
    engine = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    return statistics.median(gaps) * 1000, engine * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch threads for both (default: torch's)")
    args = p.parse_args(argv)
    info = ensure_model(default_model_dir(0))
    prompts = [text for text, _ in make_prompts(info.path, args.requests)]
    best = {"step": float("inf"), "engine": float("inf"), "client": float("inf")}
    for round_ in range(args.rounds):
        step = in_process_step_ms(info.path, args.new_tokens // 2, args.threads)
        client, engine = served(info.path, prompts, args.new_tokens, args.threads)
        print(
            f"round {round_ + 1}: in-process step {step:.1f} ms, engine ITL {engine:.1f} ms, "
            f"client ITL p50 {client:.1f} ms",
            flush=True,
        )
        best = {
            "step": min(best["step"], step),
            "engine": min(best["engine"], engine),
            "client": min(best["client"], client),
        }
    print(
        f"best: in-process step {best['step']:.1f} ms; served ITL p50 {best['client']:.1f} ms "
        f"(+{best['client'] - best['step']:.1f} ms: engine +{best['engine'] - best['step']:.1f}, "
        f"delivery +{best['client'] - best['engine']:.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
