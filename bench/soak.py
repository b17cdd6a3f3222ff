"""Soak test (not part of `make test`): minutes of mixed load at 32 clients against a real
`textgen serve`, checking that no request fails and resident memory stays flat after warm-up.

    python -m bench.soak [--minutes 5] [--clients 32] [--model-dir DIR] [--out FILE]

Mixed load: /generate (greedy and sampled, 8..128 tokens), /generate_stream (some dropped
mid-stream on purpose), /v1/completions, /embed. Memory is sampled every second; growth is the last
minute's median over the median of the minute after warm-up.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.model import default_model_dir, ensure_model, make_prompts
from bench.servers import RssSampler, Server, free_port, venv_script

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "soak.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="Load duration (default 5).")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="Excluded from memory growth (default 1).")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent clients (default 32).")
    parser.add_argument("--model-dir", type=Path, help="Model to serve (default: the benchmark's GPT-2-124M).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT}).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


async def one_request(client: httpx.AsyncClient, rng: random.Random, prompt: str, model: str) -> str:
    """Send one request of a random kind; return the outcome label ('ok', 'dropped' or an error)."""
    kind = rng.choices(["generate", "sample", "stream", "drop", "openai", "embed"], [3, 2, 2, 1, 2, 1])[0]
    n = rng.randint(8, 128)
    params: dict[str, Any] = {"max_new_tokens": n}
    if kind == "sample":
        params.update(do_sample=True, temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
    if kind in ("generate", "sample"):
        r = await client.post("/generate", json={"inputs": prompt, "parameters": params})
        return "ok" if r.status_code == 200 and "generated_text" in r.json() else f"http {r.status_code}"
    if kind in ("stream", "drop"):
        events = 0
        async with client.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": params}) as r:
            if r.status_code != 200:
                return f"http {r.status_code}"
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events += 1
                    if '"error"' in line[:20]:
                        return "stream error"
                    if kind == "drop" and events == 3:
                        return "dropped"  # leaving the context closes the connection mid-stream
        return "ok"
    if kind == "openai":
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
        r = await client.post("/v1/completions", json=body)
        return "ok" if r.status_code == 200 and r.json()["choices"] else f"http {r.status_code}"
    r = await client.post("/embed", json={"inputs": [prompt, prompt[::-1]]})
    return "ok" if r.status_code == 200 and len(r.json()) == 2 else f"http {r.status_code}"


async def run_load(url: str, args: argparse.Namespace, prompts: list[str], model: str, sampler: RssSampler) -> dict:
    deadline = time.monotonic() + args.minutes * 60
    outcomes: dict[str, int] = {}
    memory: list[tuple[float, int]] = []
    start = time.monotonic()

    async def client_loop(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            while time.monotonic() < deadline:
                try:
                    outcome = await one_request(client, rng, rng.choice(prompts), model)
                except httpx.HTTPError as exc:
                    outcome = f"transport {type(exc).__name__}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def watch() -> None:
        while time.monotonic() < deadline:
            memory.append((time.monotonic() - start, sampler.current()))
            done = sum(outcomes.values())
            print(
                f"\r[soak] {time.monotonic() - start:5.0f}s  requests {done}  rss {memory[-1][1] / 2**20:7.1f} MiB",
                end="",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(1.0)

    await asyncio.gather(watch(), *(client_loop(i) for i in range(args.clients)))
    print(file=sys.stderr)
    warm = args.warmup_minutes * 60
    after_warmup = [rss for t, rss in memory if warm <= t < warm + 60]
    last_minute = [rss for t, rss in memory if t >= memory[-1][0] - 60]
    base = statistics.median(after_warmup) if after_warmup else memory[0][1]
    end = statistics.median(last_minute)
    return {
        "outcomes": outcomes,
        "requests": sum(outcomes.values()),
        "errors": sum(v for k, v in outcomes.items() if k not in ("ok", "dropped")),
        "rss_after_warmup_mib": round(base / 2**20, 1),
        "rss_last_minute_mib": round(end / 2**20, 1),
        "rss_growth": round(end / base - 1, 4),
        "rss_peak_mib": round(max(rss for _, rss in memory) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = args.model_dir or default_model_dir(0)
    if args.model_dir is None:
        ensure_model(model_dir)
    prompts = [text for text, _ in make_prompts(model_dir, 64)]
    port = free_port()
    textgen = venv_script("textgen") or "textgen"
    log_path = args.out.parent / "logs" / "soak-server.log"
    server = Server(
        "textgen",
        [
            textgen,
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--served-model-name",
            "soak",
            "--max-batch-size",
            str(args.clients),
        ],
        port,
        log_path,
        {**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    server.start()
    try:
        server.wait_healthy(300)
        assert server.proc is not None
        with RssSampler(server.proc.pid) as sampler:
            result = asyncio.run(run_load(server.base_url, args, prompts, "soak", sampler))
        health = httpx.get(server.base_url + "/health", timeout=10).status_code
    finally:
        server.stop(grace_s=60)
    result.update(minutes=args.minutes, clients=args.clients, model=str(model_dir), health_after=health)
    result["pass"] = result["errors"] == 0 and result["rss_growth"] < 0.10 and health == 200
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"soak {'PASS' if result['pass'] else 'FAIL'}: {result['requests']} requests, {result['errors']} errors, "
        f"RSS growth after warm-up {result['rss_growth']:+.1%} (limit +10%)"
    )
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
