"""Prefix caching, served: TTFT of 32 clients whose prompts share a 300-token system prompt, with
`textgen serve` started twice on the benchmark model (TEXTGEN_PREFIX_CACHE=false, then true).

Each round sends the same burst to each server in turn (order alternated): a first request with
the system prompt alone (it fills the cache of the server that has one), then 32 concurrent
streamed `/v1/completions`, each the system prompt + its own 32-token question (new questions every
round, so only the system prompt can hit). TTFT is the first streamed token's arrival, per request;
a round's figure is its p50, and each side reports its best round (least disturbed by other load).

    python -m bench.prefix [--rounds 3] [--clients 32] [--out bench/results/prefix.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.model import default_model_dir, ensure_model, make_prompts
from bench.servers import Server, free_port, textgen_env

REPO = Path(__file__).resolve().parents[1]
SYSTEM_TOKENS = 300
QUESTION_TOKENS = 32
NEW_TOKENS = 16
MODEL_NAME = "bench"


async def first_token(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[float, int]:
    """Seconds to the first streamed token, and the request's cached prompt tokens."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    cached = -1
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("text") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    if ttft is None:
        raise RuntimeError("no token came back")
    return ttft, cached


async def burst(url: str, system: str, questions: list[str]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=len(questions) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        await first_token(client, url, system)
        results = await asyncio.gather(*(first_token(client, url, system + q) for q in questions))
    ttfts = sorted(t for t, _ in results)
    return {
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
        "ttft_max_ms": round(ttfts[-1] * 1000, 1),
        "cached_tokens_per_request": statistics.median(c for _, c in results),
    }


def start(name: str, model: Path, prefix_cache: bool, log_dir: Path) -> Server:
    port = free_port()
    env = textgen_env(REPO, MODEL_NAME, TEXTGEN_PREFIX_CACHE=str(prefix_cache).lower())
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--port", str(port)]
    server = Server(name, cmd, port, log_dir / f"{name}.log", env)
    server.start()
    server.wait_healthy(300)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prefix.json")
    args = parser.parse_args(argv)
    info = ensure_model(default_model_dir(0))
    windows = make_prompts(info.path, 1 + args.rounds * args.clients, QUESTION_TOKENS)
    system = " ".join(text for text, _ in make_prompts(info.path, 10, SYSTEM_TOKENS // 10))
    questions = [text for text, _ in windows[1:]]
    log_dir = args.out.parent / "prefix-logs"
    sides = {"off": False, "on": True}
    servers: dict[str, Server] = {}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    try:
        for name, enabled in sides.items():
            servers[name] = start(f"prefix-{name}", info.path, enabled, log_dir)
        for r in range(args.rounds):
            chunk = questions[r * args.clients : (r + 1) * args.clients]
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                result = asyncio.run(burst(servers[name].base_url, system, chunk))
                rounds[name].append(result)
                print(f"round {r + 1} {name}: {result}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    best = {name: min(rs, key=lambda x: x["ttft_p50_ms"]) for name, rs in rounds.items()}
    summary = {
        "model": str(info.path),
        "clients": args.clients,
        "system_prompt_words": len(system.split()),
        "question_tokens": QUESTION_TOKENS,
        "rounds": rounds,
        "best": best,
        "ttft_p50_ratio_off_over_on": round(best["off"]["ttft_p50_ms"] / best["on"]["ttft_p50_ms"], 2),
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("best", "ttft_p50_ratio_off_over_on", "load_average")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
