"""The GPU benchmark behind `bench/gpu.sh`: one prepared run of `textgen serve` on CUDA.

It builds a GPT-2-124M-shaped model (GPT2Config(), random weights) with the tokenizer it is given,
then for each configuration (fp16/bf16, decode step compiled into CUDA graphs or eager) starts
`python3 -m app.cli serve` on 127.0.0.1 and drives it with bench's own closed-loop streaming clients
at 1, 32 and 128 clients. Results go to `OUT/gpu.json` (and a table on stdout) after every phase, so a
run cut short still leaves what it measured. The whole run is bounded by `--budget-s`.

`--dry-run` does the same on CPU with a 2-layer model, float32, 1 and 4 clients and a few tokens; a
unit test runs it so the script cannot rot while no GPU is at hand.

Only httpx, torch and transformers are needed besides the app itself (no psutil): the GPU machine
has a bare Python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.clients import Job, closed_loop, make_client, ours_stream_sender
from bench.stats import from_records, percentile

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a model token server batch cache graph kernel memory request stream text prompt answer "
    "python function module import class value list string number time step layer head weight"
).split()


@dataclass(frozen=True)
class Config:
    name: str
    device: str
    dtype: str
    compile: bool
    compact: bool = True  # False: the transformers forward (TEXTGEN_COMPACT_FORWARD=false), the baseline


@dataclass(frozen=True)
class Plan:
    configs: list[Config]
    levels: list[int]
    new_tokens: int
    prompt_words: int
    model_kwargs: dict[str, int]
    phase_timeout_s: float
    startup_timeout_s: float

    def requests(self, clients: int) -> int:
        return max(8, 2 * clients)


def make_plan(dry_run: bool) -> Plan:
    if dry_run:
        return Plan(
            configs=[
                Config("cpu-float32-eager", "cpu", "float32", False),
                Config("cpu-float32-compiled", "cpu", "float32", True),
            ],
            levels=[1, 4],
            new_tokens=8,
            prompt_words=12,
            model_kwargs={"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256},
            phase_timeout_s=60.0,
            startup_timeout_s=120.0,
        )
    # Most telling first, in case the budget runs out: compact vs transformers forward in bf16.
    configs = [
        Config("cuda-bfloat16-eager", "cuda", "bfloat16", False),
        Config("cuda-bfloat16-transformers", "cuda", "bfloat16", False, compact=False),
        Config("cuda-float16-eager", "cuda", "float16", False),
        Config("cuda-bfloat16-graphs", "cuda", "bfloat16", True),
        Config("cuda-float16-graphs", "cuda", "float16", True),
    ]
    return Plan(
        configs=configs,
        levels=[1, 32, 128],
        new_tokens=128,
        prompt_words=24,
        model_kwargs={},
        phase_timeout_s=75.0,
        startup_timeout_s=180.0,
    )


def build_model(tokenizer: Path, out: Path, model_kwargs: dict[str, int]) -> Path:
    """GPT2Config(**model_kwargs) with random weights (seed 0) and `tokenizer`, saved in `out`."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=max(len(tok), 50257), bos_token_id=eos, eos_token_id=eos, **model_kwargs)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`python -m app.cli serve` in its own process group, its output in `log`."""

    def __init__(self, model: Path, config: Config, log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            TEXTGEN_MODEL=str(model),
            TEXTGEN_DEVICE=config.device,
            TEXTGEN_DTYPE=config.dtype,
            TEXTGEN_COMPILE="true" if config.compile else "false",
            TEXTGEN_COMPACT_FORWARD="true" if config.compact else "false",
            TEXTGEN_DRAIN_DELAY="0",
            TEXTGEN_MAX_BATCH_SIZE="128",
            TEXTGEN_MAX_QUEUE="512",
            TEXTGEN_HOST="127.0.0.1",
            TEXTGEN_PORT=str(self.port),
        )
        self._log = log.open("wb")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_healthy(self, timeout_s: float) -> float:
        start = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() - start < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout_s:.0f}s: {self.tail()}")

    def info(self) -> dict[str, Any]:
        try:
            return dict(httpx.get(self.base_url + "/info", timeout=10.0, trust_env=False).json())
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": str(exc)}

    def tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()


async def run_level(base_url: str, prompts: list[str], clients: int, plan: Plan) -> dict[str, Any]:
    jobs = [Job(i, prompts[i % len(prompts)], plan.new_tokens, plan.new_tokens) for i in range(plan.requests(clients))]
    async with make_client(clients, plan.phase_timeout_s) as client:
        result = await closed_loop(client, ours_stream_sender(base_url), jobs, clients, plan.phase_timeout_s)
    phase = from_records(f"{clients} clients", clients, result.records, result.wall_s)
    itl = [
        (r.done - r.first_token) / (r.generated_tokens - 1)
        for r in result.records
        if r.error is None and r.done is not None and r.first_token is not None and r.generated_tokens > 1
    ]
    phase.extra["itl_p50_s"] = None if not itl else round(percentile(itl, 50) or 0.0, 6)
    out = phase.to_json()
    out["timed_out"] = result.timed_out
    return out


def _server_supports_compile() -> bool:
    """Whether the app has the TEXTGEN_COMPILE setting (read from its source: the GPU machine may
    lack pydantic-settings in this interpreter's path until PYTHONPATH is set for the server)."""
    return "compile:" in (REPO / "app" / "config.py").read_text()


def write(out: Path, results: dict[str, Any]) -> None:
    (out / "gpu.json").write_text(json.dumps(results, indent=1))


def table(results: dict[str, Any]) -> str:
    lines = [f"{'config':28} {'clients':>7} {'tok/s':>9} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} errors"]
    for name, run in results["configs"].items():
        for level in run.get("levels", []):
            ttft = level.get("ttft_p50_s")
            itl = level.get("itl_p50_s")
            lines.append(
                f"{name:28} {level['concurrency']:>7} {level['tok_per_s']:>9.1f} "
                f"{'' if ttft is None else f'{ttft * 1e3:.1f}':>12} {'' if itl is None else f'{itl * 1e3:.2f}':>11} "
                f"{level.get('errors', 0)}"
            )
        if run.get("error"):
            lines.append(f"{name:28} failed: {run['error'][:300]}")
        if run.get("skipped"):
            lines.append(f"{name:28} skipped: {run['skipped']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, help="results directory (default: $OUT)")
    p.add_argument("--tokenizer", type=Path, default=REPO / ".gpu" / "gpt2-tokenizer", help="GPT-2 tokenizer dir")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 and 4 clients (for tests)")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new configs after this")
    p.add_argument("--only", help="comma-separated config names to run (default: all)")
    args = p.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        p.error("give a results directory or set $OUT")
    out.mkdir(parents=True, exist_ok=True)
    if not (args.tokenizer / "tokenizer_config.json").exists():
        p.error(f"no tokenizer at {args.tokenizer} (copy ../shared/models/gpt2-tokenizer there)")
    started = time.monotonic()
    plan = make_plan(args.dry_run)
    configs = [c for c in plan.configs if not args.only or c.name in args.only.split(",")]

    import torch
    import transformers

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "workload": {"new_tokens": plan.new_tokens, "prompt_words": plan.prompt_words, "greedy": True},
        "configs": {},
    }
    model = build_model(args.tokenizer, out / "model", plan.model_kwargs)
    results["model"] = {"path": str(model), **plan.model_kwargs}
    prompts = make_prompts(256, plan.prompt_words, seed=0)
    write(out, results)
    compile_supported = _server_supports_compile()
    for config in configs:
        if time.monotonic() - started > args.budget_s:
            results["configs"][config.name] = {"error": "skipped: over the time budget"}
            continue
        if config.compile and not compile_supported:
            results["configs"][config.name] = {"skipped": "this textgen has no TEXTGEN_COMPILE (CUDA graphs) yet"}
            continue
        run: dict[str, Any] = {"config": config.__dict__, "levels": []}
        results["configs"][config.name] = run
        server = ServeProcess(model, config, out / f"{config.name}.log")
        try:
            run["startup_s"] = round(server.wait_healthy(plan.startup_timeout_s), 2)
            run["info"] = server.info()
            asyncio.run(run_level(server.base_url, prompts, min(8, max(plan.levels)), plan))  # warm-up
            for clients in plan.levels:
                print(f"[gpu.sh] {config.name}: {clients} clients", file=sys.stderr, flush=True)
                run["levels"].append(asyncio.run(run_level(server.base_url, prompts, clients, plan)))
                write(out, results)
        except Exception as exc:  # one failed configuration must not lose the others
            run["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            server.stop()
        write(out, results)
    results["wall_s"] = round(time.monotonic() - started, 1)
    write(out, results)
    print(table(results))
    failed = [
        n for n, r in results["configs"].items() if r.get("error") or ("skipped" not in r and not r.get("levels"))
    ]
    return 1 if failed and len(failed) == len(results["configs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
