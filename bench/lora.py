"""Many LoRA adapters on one server: `python -m bench.lora [--quick]` (a `make bench` phase).

One `textgen serve` on the GPT-2-124M shape (bench/model.py) with 4 rank-16 adapters (c_attn, as
`textgen finetune --lora` trains them) loaded unmerged at startup, runtime loading on. Measures:
- throughput: 32 clients spread over the 4 adapters and the base, against the same 32 clients all
  on the base (same server; a loaded adapter that no row uses costs nothing), alternated in rounds;
  target >= 0.75x;
- greedy equality: each adapter's tokens over HTTP against the adapter merged into the base
  (`load_model(adapter=...)`, as `--adapter` serves it) and run alone in-process, token for token;
- loading under load: while the 32 clients run, a 5th adapter is loaded and unloaded over HTTP a
  few times; p99 inter-token latency of the token gaps that overlap a load, against the p99 of a
  steady phase of the same workload (target < 2x), and no request may fail.
Prints the ratios and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.model import default_model_dir, ensure_model, make_prompts
from bench.servers import Server, free_port
from bench.stats import percentile

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "lora.json"
CLIENTS = 32
ADAPTERS = 4
RANK = 16
PROMPT_TOKENS = 32
# Random A and B of this spread give a weight update of about 0.2x the base's (GPT-2 init 0.02):
# outputs change, as a trained adapter's do, without saturating attention.
ADAPTER_STD = 0.04


@dataclass
class Phase:
    """One closed-loop phase: tokens, wall time, every token's arrival time, errors."""

    tokens: int = 0
    wall_s: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (previous arrival, arrival), perf_counter
    errors: list[str] = field(default_factory=list)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


async def stream_one(
    client: httpx.AsyncClient, url: str, prompt: str, new: int, adapter: str | None, phase: Phase
) -> None:
    parameters: dict = {"max_new_tokens": new, "min_new_tokens": new}
    if adapter is not None:
        parameters["adapter_id"] = adapter
    last = None
    async with client.stream("POST", url + "/generate_stream", json={"inputs": prompt, "parameters": parameters}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event.get("error"):
                raise RuntimeError(str(event["error"])[:200])
            if event.get("token") is not None:
                now = time.perf_counter()
                if last is not None:
                    phase.gaps.append((last, now))
                last = now
                phase.tokens += 1


async def closed_loop(url: str, jobs: list[tuple[str, str | None]], new: int, phase: Phase | None = None) -> Phase:
    """`CLIENTS` clients working through `jobs` (prompt, adapter), each taking the next when done."""
    phase = phase or Phase()
    queue = list(reversed(jobs))
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(limits=limits, timeout=600, trust_env=False) as client:

        async def worker() -> None:
            while queue:
                prompt, adapter = queue.pop()
                try:
                    await stream_one(client, url, prompt, new, adapter, phase)
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    phase.errors.append(f"{adapter}: {exc}"[:300])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        phase.wall_s = time.perf_counter() - start
    return phase


def build_adapters(base: Path, root: Path, names: list[str]) -> None:
    from tests.adapters import build_adapter

    for i, name in enumerate(names):
        if not (root / name / "adapter_config.json").exists():
            build_adapter(base, root / name, ["c_attn"], RANK, seed=100 + i, alpha=16.0, std=ADAPTER_STD)


def merged_greedy(base: Path, adapter: Path, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy ids of each prompt alone, on the base with `adapter` merged (as `--adapter` serves it)."""
    from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
    from app.engine.engine import Engine
    from app.engine.load.loader import load_model

    lm = load_model(str(base), adapter=str(adapter))
    engine = Engine(lm, None, max_batch_size=1, max_batch_tokens=4096, max_prefill_tokens=1024, max_queue=4)  # type: ignore[arg-type]  # no embeddings
    engine.start()
    out = []
    try:
        for ids in prompts:
            done = threading.Event()
            result: list = []

            def on_event(event, result=result, done=done) -> None:  # noqa: ANN001
                if event.completion is not None:
                    result.append(event.completion)
                    done.set()

            engine.submit(GenerationRequest(ids, SamplingParams(), StoppingParams(new, new), on_event))
            assert done.wait(600), "the in-process engine did not finish"
            out.append([t.id for t in result[0].tokens])
    finally:
        engine.stop()
    return out


def served_greedy(url: str, prompt: str, adapter: str, new: int) -> list[int]:
    body = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": new, "min_new_tokens": new, "adapter_id": adapter, "details": True},
    }
    r = httpx.post(url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    return [t["id"] for t in r.json()["details"]["tokens"]]


async def load_during(url: str, jobs: list[tuple[str, str | None]], new: int, loads: int) -> dict:
    """`CLIENTS` requests of `new` tokens started together; once every one is decoding (no prefill
    left to stall the steps), adapter `extra` is loaded and unloaded `loads` times, 1 s apart. The
    token gaps that overlap a load are compared with the other gaps of the same decode stretch."""
    phase = Phase()
    windows: list[tuple[float, float]] = []
    errors: list[str] = []
    decoding_from = [0.0]

    async def loader() -> None:
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            while phase.tokens < 3 * CLIENTS:
                await asyncio.sleep(0.05)
            decoding_from[0] = time.perf_counter()
            for _ in range(loads):
                await asyncio.sleep(1.0)
                start = time.perf_counter()
                r = await client.post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})
                windows.append((start, time.perf_counter()))
                if r.status_code != 200:
                    errors.append(f"load: {r.status_code} {r.text[:200]}")
                r = await client.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"})
                if r.status_code != 200:
                    errors.append(f"unload: {r.status_code} {r.text[:200]}")
            decoding_from.append(time.perf_counter())

    done, _ = await asyncio.gather(closed_loop(url, jobs, new, phase), loader())
    start, end = decoding_from[0], decoding_from[-1]
    during, steady = [], []
    for t0, t1 in done.gaps:
        if t0 < start or t1 > end + 1.0:
            continue
        (during if any(t0 < we and t1 > ws for ws, we in windows) else steady).append(t1 - t0)
    steady_p99, during_p99 = percentile(steady, 99), percentile(during, 99)
    return {
        "loads": len(windows),
        "load_ms": [1000 * (we - ws) for ws, we in windows],
        "errors": done.errors + errors,
        "steady_itl_p99_s": steady_p99,
        "during_load_itl_p99_s": during_p99,
        "gaps_during_load": len(during),
        "gaps_steady": len(steady),
        "ratio": during_p99 / steady_p99 if during_p99 and steady_p99 else None,
        "target": 2.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--model-dir", type=Path)
    args = p.parse_args(argv)
    rounds = 1 if args.quick else 2
    new = 32 if args.quick else 64
    per_phase = CLIENTS * (1 if args.quick else 2)
    log = lambda msg: print(f"[lora] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    info = ensure_model(args.model_dir or default_model_dir(0))
    base = info.path
    root = Path(tempfile.gettempdir()) / "textgen-bench" / f"lora-r{RANK}-std{ADAPTER_STD}-{base.name}"
    names = [f"ad{i}" for i in range(ADAPTERS)]
    build_adapters(base, root, [*names, "extra"])
    prompts = make_prompts(base, per_phase, PROMPT_TOKENS)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TEXTGEN_LORA_ADAPTERS=",".join(f"{n}={root / n}" for n in names),
        TEXTGEN_ALLOW_RUNTIME_LORA="true",
        TEXTGEN_LORA_ROOT=str(root),
        TEXTGEN_MAX_LORAS=str(ADAPTERS + 1),
        TEXTGEN_MAX_LORA_RANK=str(RANK),
        TEXTGEN_MAX_BATCH_SIZE=str(CLIENTS),
        TEXTGEN_DRAIN_DELAY="0",
        TEXTGEN_UI="false",
    )
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(base), "--host", "127.0.0.1", "--port", str(port)]
    server = Server("textgen", cmd, port, Path(tempfile.gettempdir()) / "textgen-bench" / "lora-server.log", env)
    server.start()
    result: dict = {"model": str(base), "adapters": ADAPTERS, "rank": RANK, "clients": CLIENTS, "new_tokens": new}
    try:
        server.wait_healthy(300)
        url = server.base_url
        texts = [t for t, _ in prompts]
        spread = [None, *names]
        base_jobs = [(t, None) for t in texts]
        mixed_jobs = [(t, spread[i % len(spread)]) for i, t in enumerate(texts)]
        asyncio.run(closed_loop(url, base_jobs[:CLIENTS], 4))  # warm-up
        base_tps, mixed_tps, errors = [], [], []
        for r in range(rounds):  # alternated: base, mixed
            b = asyncio.run(closed_loop(url, base_jobs, new))
            m = asyncio.run(closed_loop(url, mixed_jobs, new))
            base_tps.append(b.tok_per_s)
            mixed_tps.append(m.tok_per_s)
            errors += b.errors + m.errors
            log(f"round {r + 1}: base {b.tok_per_s:.1f} tok/s, 4 adapters + base {m.tok_per_s:.1f} tok/s")
        ratio = sum(mixed_tps) / sum(base_tps)
        result["throughput"] = {"base_tok_s": base_tps, "mixed_tok_s": mixed_tps, "ratio": ratio, "target": 0.75}

        loads = 3 if args.quick else 5
        # Long enough that no request ends (and none starts) while the loads run.
        rl = asyncio.run(load_during(url, mixed_jobs[:CLIENTS], 24 + 12 * loads, loads))
        result["runtime_load"] = rl
        errors += rl["errors"]

        checked = 4 if args.quick else 8
        equal = {}
        for i, name in enumerate(names):
            sample = prompts[i :: len(names)][:checked]
            served = [served_greedy(url, text, name, new) for text, _ in sample]
            merged = merged_greedy(base, root / name, [ids for _, ids in sample], new)
            equal[name] = sum(s == m for s, m in zip(served, merged, strict=True)) / len(sample)
        result["greedy_equal_share"] = equal
        result["errors"] = errors
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    t = result["throughput"]
    rl = result["runtime_load"]
    ratio_text = "n/a" if rl["ratio"] is None else f"{rl['ratio']:.3f}"
    print(f"LoRA (GPT-2-124M shape, {ADAPTERS} rank-{RANK} adapters + base, {CLIENTS} clients, {new} tokens each)")
    print(
        f"  throughput, mixed / base alone: {t['ratio']:.3f}  (target >= 0.75; base {sum(t['base_tok_s']) / rounds:.1f} tok/s)"
    )
    print(f"  greedy equal to merged, share of prompts per adapter: {result['greedy_equal_share']}")
    print(
        f"  p99 ITL during runtime loads / steady decode: {ratio_text}  (target < 2; {rl['gaps_during_load']} gaps "
        f"overlap {rl['loads']} loads of {', '.join(f'{x:.0f}' for x in rl['load_ms'])} ms, {rl['gaps_steady']} do not)"
    )
    print(f"  errors: {len(result['errors'])}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
