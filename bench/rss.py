"""Where `textgen serve`'s resident memory goes: RSS per startup stage, idle, and peak under load.

`python -m bench.rss` (about two minutes on 2 cores; every phase is bounded in time):
1. stages, in a fresh interpreter: the same calls `Service.load` makes, one at a time, with the
   process's RSS (and its anonymous / file-backed parts) after each: bare Python, `import torch`,
   transformers, the web stack, the app, the model loaded, the self-test, the engine, the grammar
   compiler's vocabulary;
2. a real `textgen serve` (the peer benchmark's settings: CPU, fp32, GPT-2-124M shape, random
   weights): RSS when healthy, after a warm-up, the peak while 32 streaming clients run requests of
   ~32 prompt tokens and 64 new tokens (greedy), and once they are done. `--system-tokens 300`
   puts the same ~300-token system prompt before every prompt (the shared-prefix case the KV
   pool's shared pages are for).

`--server-env KEY=VAL` (repeatable) sets the server's environment for A/B runs, e.g.
`--server-env MALLOC_ARENA_MAX=8`. Measured figures are in docs/performance.md, "Memory".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.clients import Job, closed_loop, make_client, ours_stream_sender
from bench.model import default_model_dir, ensure_model, make_prompts
from bench.servers import RssSampler, Server, free_port, venv_script

MIB = 1 << 20
CLIENTS = 32
PROMPT_TOKENS = 32
NEW_TOKENS = 64
SERVER_ENV = {"TEXTGEN_DEVICE": "cpu", "TEXTGEN_DTYPE": "float32", "TEXTGEN_DRAIN_DELAY": "0"}


def memory(pid: int | None = None) -> dict[str, int]:
    """RSS, its anonymous and file-backed parts, and the high-water mark, in MiB (/proc status)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "hwm"}
    out: dict[str, int] = {}
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) // 1024
    return out


def _stage(name: str) -> None:
    print(json.dumps({"stage": name, **memory()}), flush=True)


def stages(model: str) -> None:
    """In this (fresh) process: `Service.load`'s steps one by one, a JSON line of memory after each."""
    _stage("python")
    import torch

    _stage("import torch")
    import transformers  # noqa: F401

    _stage("+ import transformers")
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401

    _stage("+ import fastapi, uvicorn")
    import app.main  # noqa: F401
    from app.config import Settings
    from app.engine.core.admission import default_budget, model_layers
    from app.engine.core.constraints import GrammarCompiler
    from app.engine.engine import Engine
    from app.engine.load.loader import load_model
    from app.engine.load.selftest import self_test
    from app.engine.models.lora import AdapterRegistry
    from app.engine.runner.embeddings import from_causal_lm
    from app.metrics import Metrics

    _stage("+ import app.main (the whole app)")
    s = Settings(model=model, device="cpu", dtype="float32")
    if s.torch_threads is not None:
        torch.set_num_threads(s.torch_threads)
    loaded = load_model(
        model,
        device=s.device,
        dtype=s.dtype,
        compact_forward=s.compact_forward,
        kv_cache_dtype=s.kv_cache_dtype,
        batch_invariant=s.batch_invariant,
        quantize=s.quantize,
    )
    _stage("+ load_model (weights, tokenizer, compact forward)")
    self_test(loaded)
    _stage("+ self_test")
    limits = loaded.limits
    max_prefill = max(s.max_prefill_tokens, limits.max_input_tokens)
    layers = model_layers(loaded.model.config)
    metrics = Metrics()
    engine = Engine(
        loaded,
        from_causal_lm(loaded.model, loaded.tokenizer, limits.max_input_tokens, model),
        max_batch_size=s.max_batch_size,
        max_batch_tokens=s.max_batch_tokens
        or default_budget(s.max_batch_size, limits.max_total_tokens, max_prefill, layers),
        max_prefill_tokens=max_prefill,
        max_queue=s.max_queue,
        max_embed_batch=s.max_embed_batch,
        metrics=metrics,
        prefix_cache_tokens=s.prefix_cache_max_tokens if s.prefix_cache else 0,
        adapters=AdapterRegistry(loaded.compact, model, s.max_loras, s.max_lora_rank, metrics.lora_changed),
    )
    engine.start()
    gc.collect()
    gc.freeze()
    _stage("+ engine started")
    grammars = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, sorted(engine.eos_ids))
    grammars.warm()
    _stage("+ grammar compiler warmed (llguidance)")
    engine.stop()


def run_stages(model: Path, env: dict[str, str], timeout_s: float) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rss", "--stages-only", str(model)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise RuntimeError(f"stages failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return rows


def run_server(
    model: Path, env: dict[str, str], requests: int, timeout_s: float, log_dir: Path, system_tokens: int = 0
) -> list[dict[str, Any]]:
    exe = venv_script("textgen")
    if exe is None:
        raise SystemExit("the `textgen` CLI is not installed in this venv")
    port = free_port()
    cmd = [exe, "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    server = Server("textgen serve", cmd, port, log_dir / "rss-server.log", env)
    prompts = [text for text, _ in make_prompts(model, CLIENTS * 2, PROMPT_TOKENS)]
    if system_tokens:  # a window the client prompts (32-token windows) do not start with
        system = make_prompts(model, CLIENTS * 2 + 1, system_tokens)[-1][0]
        prompts = [f"{system}\n{text}" for text in prompts]
    rows: list[dict[str, Any]] = []
    server.start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        with RssSampler(pid) as startup:
            server.wait_healthy(timeout_s)
        time.sleep(1.0)
        rows.append({"stage": "server healthy (idle)", **memory(pid), "peak": startup.peak_bytes // MIB})
        send = ours_stream_sender(server.base_url)

        async def load() -> tuple[int, int]:
            async with make_client(CLIENTS + 8, timeout_s) as client:
                warm = [Job(i, prompts[i % len(prompts)], 8, 8) for i in range(CLIENTS)]
                await closed_loop(client, send, warm[:2], 1, timeout_s)
                await closed_loop(client, send, warm, CLIENTS, timeout_s)
                rows.append({"stage": "after warm-up (2 + 32 short requests)", **memory(pid)})
                jobs = [Job(i, prompts[i % len(prompts)], NEW_TOKENS, NEW_TOKENS) for i in range(requests)]
                with RssSampler(pid, interval_s=0.02) as rss:
                    res = await closed_loop(client, send, jobs, CLIENTS, timeout_s)
                errors = [r.error for r in res.records if r.error]
                if errors:
                    raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
                return rss.peak_bytes, sum(r.generated_tokens for r in res.records)

        peak, tokens = asyncio.run(load())
        shared = f", {system_tokens}-token system prompt" if system_tokens else ""
        rows.append({"stage": f"{CLIENTS} clients x {requests} requests ({tokens} tokens{shared})", **memory(pid)})
        rows[-1]["peak"] = peak // MIB
        time.sleep(1.0)
        rows.append({"stage": "idle after the load", **memory(pid)})
        rows[-1]["peak"] = psutil.Process(pid).memory_info().rss // MIB
    finally:
        server.stop()
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<52} {'RSS':>6} {'anon':>6} {'file':>6} {'peak':>6}  (MiB)"]
    for r in rows:
        peak = r.get("peak", r.get("hwm", ""))
        lines.append(f"{r['stage']:<52} {r['rss']:>6} {r['anon']:>6} {r['file']:>6} {peak:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rss", description=__doc__.splitlines()[0])
    p.add_argument("--stages-only", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help="model directory (default: the benchmark model, built if missing)")
    p.add_argument("--requests", type=int, default=64, help="requests in the loaded phase (default 64)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VAL", help="server environment")
    p.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of this many tokens")
    p.add_argument("--skip-stages", action="store_true", help="measure the server only")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on each phase, seconds (default 300)")
    args = p.parse_args(argv)
    if args.stages_only:
        stages(args.stages_only)
        return 0
    model = args.model or ensure_model(default_model_dir(0)).path
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **SERVER_ENV}
    for pair in args.server_env:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--server-env wants KEY=VAL, got {pair!r}")
        env[key] = value
    rows = [] if args.skip_stages else run_stages(model, env, args.timeout)
    rows += run_server(model, env, args.requests, args.timeout, Path("/tmp/textgen-bench"), args.system_tokens)
    print(render(rows))
    print("peak: the most RSS sampled every 20-50 ms (server, children included), else the high-water mark")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
