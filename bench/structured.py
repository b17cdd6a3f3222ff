"""Structured-output phase: 32 concurrent clients, half constrained by a ~10-field JSON schema and
half free, against the same load with no constraints, on the GPT-2-124M-shaped bench model.

    python -m bench.structured [--rounds 2] [--requests 64] [--concurrency 32]

The two loads alternate in rounds on one `textgen serve` (same process, same warm state). Reports
generated tokens/s of each, their ratio, the mask time per decode step (from /metrics) against the
decode step time, and the compile time of new schemas (each request a schema never seen before).
"""

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.clients import Job, closed_loop, make_client
from bench.grammar_libs import SCHEMA
from bench.model import default_model_dir, ensure_model, make_prompts
from bench.servers import Server, free_port
from bench.stats import RequestRecord

NEW_TOKENS = 64


def sender(base_url: str, constrained_every: int):
    """`POST /generate`; every `constrained_every`-th job (0: none) carries the JSON schema."""

    async def send(client: httpx.AsyncClient, job: Job, rec: RequestRecord, t0: float) -> None:
        params: dict = {"max_new_tokens": job.max_new_tokens, "details": True}
        if constrained_every and job.index % constrained_every == 0:
            params["grammar"] = {"type": "json", "value": SCHEMA}
        else:
            params["min_new_tokens"] = job.max_new_tokens
        resp = await client.post(base_url + "/generate", json={"inputs": job.prompt, "parameters": params})
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        rec.generated_tokens = int(resp.json()["details"]["generated_tokens"])
        rec.done = time.perf_counter() - t0

    return send


def scrape(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {}
    for name in ("textgen_grammar_mask_seconds_sum", "textgen_grammar_mask_seconds_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    m = re.search(r'^textgen_engine_steps_total\{kind="decode"\} (\S+)$', text, re.M)
    out["decode_steps"] = float(m.group(1)) if m else 0.0
    return out


async def load(base_url: str, prompts: list[str], n: int, conc: int, constrained_every: int) -> dict:
    jobs = [Job(i, prompts[i % len(prompts)], NEW_TOKENS, 0) for i in range(n)]
    before = scrape(base_url)
    async with make_client(conc, 600) as client:
        res = await closed_loop(client, sender(base_url, constrained_every), jobs, conc, 1800)
    after = scrape(base_url)
    errors = [r.error for r in res.records if r.error]
    tokens = sum(r.generated_tokens or 0 for r in res.records if not r.error)
    steps = after["decode_steps"] - before["decode_steps"]
    masks = after["textgen_grammar_mask_seconds_count"] - before["textgen_grammar_mask_seconds_count"]
    mask_s = after["textgen_grammar_mask_seconds_sum"] - before["textgen_grammar_mask_seconds_sum"]
    return {
        "tokens_per_s": tokens / res.wall_s,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "step_ms": 1e3 * res.wall_s / steps if steps else None,
        "mask_ms_per_masked_step": 1e3 * mask_s / masks if masks else 0.0,
    }


def compile_times(base_url: str, count: int = 8) -> list[float]:
    """Latency added by a never-seen schema: constrained 1-token request minus a free one."""
    added = []
    for i in range(count):
        schema = {**SCHEMA, "properties": {**SCHEMA["properties"], f"extra{i}_{time.time_ns()}": {"type": "string"}}}
        free = {"inputs": "a", "parameters": {"max_new_tokens": 1}}
        t0 = time.perf_counter()
        httpx.post(base_url + "/generate", json=free, timeout=60).raise_for_status()
        t1 = time.perf_counter()
        body = {"inputs": "a", "parameters": {"max_new_tokens": 1, "grammar": {"type": "json", "value": schema}}}
        httpx.post(base_url + "/generate", json=body, timeout=60).raise_for_status()
        added.append((time.perf_counter() - t1) - (t1 - t0))
    return added


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64, help="requests per load per round")
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    info = ensure_model(default_model_dir(0))
    prompts = [text for text, _ in make_prompts(info.path, 64)]
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(info.path), "--host", "127.0.0.1"]
    cmd += ["--port", str(port)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TEXTGEN_DEVICE": "cpu",
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_DRAIN_DELAY": "0",
    }
    env["TEXTGEN_MAX_BATCH_SIZE"] = str(args.concurrency)
    log = Path(tempfile.gettempdir()) / "textgen-bench-structured.log"
    server = Server("textgen serve", cmd, port, log, env)
    server.start()
    try:
        server.wait_healthy(600)
        url = server.base_url
        asyncio.run(load(url, prompts, args.concurrency, args.concurrency, 2))  # warm-up (and compile)
        results: dict[str, list[dict]] = {"free": [], "half constrained": []}
        for r in range(args.rounds):
            order = ["free", "half constrained"] if r % 2 == 0 else ["half constrained", "free"]
            for name in order:
                res = asyncio.run(load(url, prompts, args.requests, args.concurrency, 2 if name != "free" else 0))
                results[name].append(res)
                print(f"round {r + 1} {name}: {json.dumps(res)}", file=sys.stderr)
        added = compile_times(url)
    finally:
        server.stop()
    free = statistics.median(x["tokens_per_s"] for x in results["free"])
    mixed = statistics.median(x["tokens_per_s"] for x in results["half constrained"])
    step = statistics.median(x["step_ms"] for x in results["half constrained"] if x["step_ms"])
    mask = statistics.median(x["mask_ms_per_masked_step"] for x in results["half constrained"])
    print(f"model {info.path.name}, {args.concurrency} clients, {args.requests} requests x {args.rounds} rounds")
    print(f"free: {free:.1f} tok/s; half constrained: {mixed:.1f} tok/s; ratio {mixed / free:.3f}")
    print(f"decode step {step:.1f} ms; mask per step {mask:.3f} ms ({100 * mask / step:.2f}% of a step)")
    print(f"new schema adds p50 {1e3 * statistics.median(added):.1f} ms (max {1e3 * max(added):.1f} ms)")


if __name__ == "__main__":
    main()
