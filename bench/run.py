"""One benchmark run: in-process baselines, `transformers serve` (peer) and `textgen serve` (ours) on
the same model and prompts; prints a table and writes JSON. `python -m bench.run --help`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.clients import (
    Job,
    ProgressPrinter,
    Sender,
    closed_loop,
    make_client,
    ours_stream_sender,
    peer_completion_sender,
)
from bench.model import ModelInfo, default_model_dir, ensure_model, make_prompts
from bench.report import GIB, compute_ratios, render
from bench.servers import RssSampler, Server, ServerError, free_port, venv_script
from bench.stats import from_records, percentile, shortest_quarter

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
PROMPT_TOKENS = 32
NEW_TOKENS = 64
MIXED_MIN, MIXED_MAX = 8, 256
STATIC_GROUP = 32
WARMUP_BURST = 32
BUSY_LOAD = 1.0  # 1-minute load average above which the run is flagged as taken on a busy machine
RSS_ALLOWANCE_BYTES = 1 * GIB  # Python + torch + transformers + web stack, on top of weights and KV


@dataclass
class Plan:
    """Counts for one run; `--quick` shrinks them (see docs/benchmark.md)."""

    quick: bool
    baseline_requests: int
    ceiling_batch: int
    levels: list[int]
    run_peer: bool
    peer_concurrency: int
    peer_requests: int
    mixed_requests: int
    mixed_concurrency: int
    ttft_reps: int
    new_tokens: int
    mixed_max: int
    peer_rounds: int

    def level_requests(self, concurrency: int) -> int:
        return max(concurrency, 4) if self.quick else max(2 * concurrency, 16)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        levels = (
            [int(x) for x in args.levels.split(",") if x.strip()]
            if args.levels
            else ([1, 32] if quick else [1, 8, 32, 64])
        )
        run_peer = not args.skip_peer and (args.peer or not quick)
        mixed_requests = args.mixed_requests or (32 if quick else 128)
        return cls(
            quick=quick,
            baseline_requests=2 if quick else 4,
            ceiling_batch=32,
            levels=levels,
            run_peer=run_peer,
            peer_concurrency=32,
            peer_requests=32 if quick else 64,
            mixed_requests=mixed_requests,
            mixed_concurrency=args.mixed_concurrency or mixed_requests,
            ttft_reps=5 if quick else 20,
            new_tokens=args.new_tokens,
            mixed_max=args.mixed_max,
            peer_rounds=0 if args.skip_peers else (args.peer_rounds or (2 if quick else 3)),
        )


class Log:
    """Progress lines on stderr, prefixed with the time since the run started."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer requests and levels; peer skipped (see docs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    p.add_argument("--model-dir", type=Path, help="reuse (or build into) this model directory")
    p.add_argument("--seed", type=int, default=0, help="weight init and mixed-length seed")
    p.add_argument("--skip-peer", action="store_true", help="do not run transformers serve")
    p.add_argument("--peer", action="store_true", help="run the peer even with --quick")
    p.add_argument("--levels", help="concurrency levels for ours, e.g. 1,8,32,64")
    p.add_argument("--port", type=int, help="port for textgen serve (default: a free one)")
    p.add_argument("--peer-port", type=int, help="port for transformers serve (default: a free one)")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="environment for textgen serve, e.g. TEXTGEN_MAX_BATCH_SIZE=64 (repeatable)",
    )
    p.add_argument("--mixed-requests", type=int, help="requests in the mixed workload (default 128, quick 32)")
    p.add_argument(
        "--mixed-concurrency",
        type=int,
        help="clients for ours in the mixed workload (default: all requests at once)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=NEW_TOKENS,
        help="tokens per request (default %(default)s; smoke tests only)",
    )
    p.add_argument(
        "--mixed-max",
        type=int,
        default=MIXED_MAX,
        help="longest mixed request (default %(default)s; smoke tests only)",
    )
    p.add_argument(
        "--skip-peers",
        action="store_true",
        help="skip the peer rounds: llama.cpp, vLLM, CTranslate2 (run when `make bench-peers` built them)",
    )
    p.add_argument(
        "--peers",
        help="contenders of the peer rounds, comma-separated (default all: "
        "textgen,textgen_bf16,textgen_nocache,textgen_int8,textgen_int4,llama_f16,llama_f32,llama_q8_0,"
        "llama_q4_0,vllm,ct2)",
    )
    p.add_argument(
        "--peer-phases",
        help="phases of the peer rounds, comma-separated (default each contender's all: c1,c32,prefix,mixed)",
    )
    p.add_argument(
        "--peers-only",
        action="store_true",
        help="only the peer rounds: the same as --skip-inprocess --skip-peer --skip-ours",
    )
    p.add_argument("--peer-rounds", type=int, help="alternated rounds of the peer phases (default 3, quick 2)")
    p.add_argument("--skip-inprocess", action="store_true", help="skip baseline, ceiling, TTFT ref, static")
    p.add_argument("--skip-ours", action="store_true", help="do not run textgen serve")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--phase-timeout", type=float, default=900.0, help="seconds per HTTP phase")
    args = p.parse_args(argv)
    if args.peers_only:
        if args.skip_peers:
            p.error("--peers-only and --skip-peers leave nothing to run")
        args.skip_inprocess = args.skip_peer = args.skip_ours = True
    if args.mixed_max < MIXED_MIN or args.new_tokens < 1:
        p.error(f"--mixed-max must be >= {MIXED_MIN} and --new-tokens >= 1")
    if args.peers:
        from bench.peer_rounds import CONTENDERS

        unknown = {k.strip() for k in args.peers.split(",")} - {c.key for c in CONTENDERS}
        if unknown:
            p.error(f"--peers: unknown {', '.join(sorted(unknown))}; known: {', '.join(c.key for c in CONTENDERS)}")
    if args.peer_phases:
        from bench.peer_rounds import ALL_PHASES

        unknown = {k.strip() for k in args.peer_phases.split(",")} - set(ALL_PHASES)
        if unknown:
            p.error(f"--peer-phases: unknown {', '.join(sorted(unknown))}; known: {', '.join(ALL_PHASES)}")
    if args.levels and not all(x.strip().isdigit() and int(x) > 0 for x in args.levels.split(",")):
        p.error("--levels wants positive integers separated by commas, e.g. 1,8,32,64")
    return args


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env wants KEY=VAL, got {pair!r}")
        env[key] = value
    return env


def meta(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "argv": sys.argv[1:],
        "plan": plan.__dict__,
        "workload": {
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": plan.new_tokens,
            "greedy": True,
            "eos_suppressed": "min_new_tokens = max_new_tokens everywhere (peer: eos_token_id=-1, see peer)",
            "mixed_new_tokens": f"uniform {MIXED_MIN}..{plan.mixed_max}, seed {args.seed}",
            "static_group": STATIC_GROUP,
        },
    }


def guarded(target: dict[str, Any], key: str, log: Log, fn: Callable[[], Any]) -> Any:
    """Run one phase; on failure record why in `target[key]` and carry on."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure of a phase is reported, not fatal
        log(f"{key}: FAILED: {type(exc).__name__}: {exc}")
        entry = target.setdefault(key, {})
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()[-2000:]
        return None


# ---------------------------------------------------------------------------------------------
# in-process


def run_inprocess(
    results: dict[str, Any],
    info: ModelInfo,
    plan: Plan,
    prompt_ids: list[list[int]],
    lengths: list[int],
    log: Log,
) -> None:
    from bench.inprocess import InProcess

    phases = results["phases"]
    log("in-process: loading model")
    ip = InProcess(info.path, info.eos_token_id)
    try:
        log("in-process: warm-up")
        ip.warm_up(prompt_ids[0], plan.ceiling_batch)

        def baseline() -> None:
            phases["baseline"] = ip.sequential(prompt_ids[: plan.baseline_requests], plan.new_tokens, log).to_json()

        def ceiling() -> None:
            phases["ceiling"] = ip.static_batch(prompt_ids[: plan.ceiling_batch], plan.new_tokens, log).to_json()

        def ttft_ref() -> None:
            log(f"ttft reference: prefill + 1 step, {plan.ttft_reps} reps")
            phases["ttft_reference"] = ip.prefill_plus_one_step(prompt_ids[0], plan.ttft_reps)

        def mixed_static() -> None:
            mixed_prompts = [prompt_ids[i % len(prompt_ids)] for i in range(len(lengths))]
            res = ip.mixed_static(mixed_prompts, lengths, STATIC_GROUP, log)
            phases["mixed"]["static"] = res.to_json()

        guarded(phases, "baseline", log, baseline)
        guarded(phases, "ceiling", log, ceiling)
        guarded(phases, "ttft_reference", log, ttft_ref)
        guarded(phases.setdefault("mixed", {}), "static", log, mixed_static)
    finally:
        ip.close()


# ---------------------------------------------------------------------------------------------
# over HTTP


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def jobs_for(prompts: list[str], count: int, new_tokens: int, offset: int = 0) -> list[Job]:
    return [Job(i, prompts[(offset + i) % len(prompts)], new_tokens, new_tokens) for i in range(count)]


async def warm_up(
    client: Any, send: Sender, prompts: list[str], burst: int, log: Log, label: str, timeout_s: float
) -> list[str]:
    """Two sequential short requests, then a concurrent burst; returns the errors seen."""
    log(f"{label}: warm-up (2 sequential + {burst} concurrent short requests)")
    seq = await closed_loop(client, send, jobs_for(prompts, 2, 8), 1, timeout_s)
    burst_res = await closed_loop(client, send, jobs_for(prompts, burst, 8, offset=2), burst, timeout_s)
    return [r.error for r in seq.records + burst_res.records if r.error]


def run_peer(
    results: dict[str, Any],
    info: ModelInfo,
    plan: Plan,
    prompts: list[str],
    args: argparse.Namespace,
    log: Log,
    log_dir: Path,
) -> None:
    phases = results["phases"]
    exe = venv_script("transformers")
    if exe is None:
        raise ServerError("the `transformers` CLI is not installed")
    port = args.peer_port or free_port()
    cmd = [
        exe,
        "serve",
        str(info.path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--continuous-batching",
        "--cb-num-blocks",
        "128",
        "--cb-max-batch-tokens",
        "2048",
    ]
    server = Server("transformers serve", cmd, port, log_dir / "peer.log", server_env())
    record: dict[str, Any] = {"command": " ".join(cmd), "log": str(server.log_path)}
    phases["peer"] = record
    log(f"peer: starting {' '.join(cmd[1:3])} on port {port}")
    try:
        server.start()
        record["startup_s"] = round(server.wait_healthy(args.startup_timeout), 2)

        async def body() -> None:
            conc = plan.peer_concurrency
            async with make_client(max(conc, WARMUP_BURST) + 8, args.phase_timeout) as client:
                # The peer's /v1/completions rejects `min_tokens` and `ignore_eos` (422); a per-request
                # `generation_config` JSON with eos_token_id=-1 makes its continuous batching never stop
                # on EOS. Fall back to the plain body if that is refused.
                gen_config = {"do_sample": False, "eos_token_id": -1}
                send = peer_completion_sender(server.base_url, {"generation_config": json.dumps(gen_config)})
                errors = await warm_up(client, send, prompts, WARMUP_BURST, log, "peer", args.phase_timeout)
                record["eos_handling"] = "generation_config JSON with eos_token_id=-1 (EOS never stops)"
                if errors:
                    log(f"peer: generation_config body refused ({errors[0][:120]}); using the plain body")
                    send = peer_completion_sender(server.base_url, {})
                    record["eos_handling"] = f"not suppressed (generation_config refused: {errors[0][:200]})"
                    errors = await warm_up(client, send, prompts, WARMUP_BURST, log, "peer", args.phase_timeout)
                    if errors:
                        raise ServerError(f"warm-up failed: {errors[0]}")
                jobs = jobs_for(prompts, plan.peer_requests, plan.new_tokens)
                log(f"peer: {len(jobs)} requests, {conc} clients")
                res = await closed_loop(
                    client, send, jobs, conc, args.phase_timeout, ProgressPrinter(f"peer c={conc}", log)
                )
                phase = from_records(f"peer: transformers serve CB c={conc}", conc, res.records, res.wall_s)
                record.update(phase.to_json())
                record["min_tokens_honoured"] = False
                record["token_count_source"] = "usage.completion_tokens"

        asyncio.run(body())
    finally:
        server.stop()
        log("peer: stopped")


def server_info(base_url: str) -> dict[str, Any]:
    """`GET /info` (limits the server resolved at startup); empty when it has none."""
    try:
        resp = httpx.get(base_url + "/info", timeout=10.0, trust_env=False)
        return resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def kv_budget(info: ModelInfo, env: dict[str, str], served: dict[str, Any]) -> tuple[int, str]:
    """The KV-cache budget textgen serve runs with, in bytes, and where it came from: `max_batch_tokens`
    from its /info, else TEXTGEN_MAX_BATCH_TOKENS, else TEXTGEN_MAX_BATCH_SIZE x TEXTGEN_MAX_TOTAL_TOKENS
    (defaults from app.config.Settings when importable, the model's context otherwise)."""
    if isinstance(served.get("max_batch_tokens"), int):
        tokens = served["max_batch_tokens"]
        return tokens * info.kv_bytes_per_token(), f"/info max_batch_tokens={tokens}"
    defaults: dict[str, Any] = {"max_batch_size": 32, "max_batch_tokens": None, "max_total_tokens": None}
    try:
        from app.config import Settings

        for name in defaults:
            defaults[name] = Settings.model_fields[name].default
    except (ImportError, KeyError, AttributeError):
        pass
    tokens_env = env.get("TEXTGEN_MAX_BATCH_TOKENS") or defaults["max_batch_tokens"]
    if tokens_env:
        tokens = int(tokens_env)
        source = f"max_batch_tokens={tokens}"
    else:
        batch = int(env.get("TEXTGEN_MAX_BATCH_SIZE") or defaults["max_batch_size"])
        total = int(env.get("TEXTGEN_MAX_TOTAL_TOKENS") or defaults["max_total_tokens"] or _context(info))
        tokens = batch * total
        source = f"max_batch_size {batch} x max_total_tokens {total}"
    return tokens * info.kv_bytes_per_token(), source


def _context(info: ModelInfo) -> int:
    try:
        return int(json.loads((info.path / "config.json").read_text()).get("n_positions", 1024))
    except (OSError, ValueError):
        return 1024


def run_ours(
    results: dict[str, Any],
    info: ModelInfo,
    plan: Plan,
    prompts: list[str],
    lengths: list[int],
    args: argparse.Namespace,
    log: Log,
    log_dir: Path,
) -> None:
    phases = results["phases"]
    exe = venv_script("textgen")
    if exe is None:
        raise ServerError("the `textgen` CLI is not installed (pip install -e .)")
    port = args.port or free_port()
    # No lame-duck pause on stop: nothing balances across this one server.
    extra = {
        "TEXTGEN_DEVICE": "cpu",
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_DRAIN_DELAY": "0",
        **parse_env(args.server_env),
    }
    cmd = [exe, "serve", "--model", str(info.path), "--host", "127.0.0.1", "--port", str(port)]
    server = Server("textgen serve", cmd, port, log_dir / "ours.log", server_env(extra))
    record: dict[str, Any] = {
        "command": " ".join(cmd),
        "server_env": {k: v for k, v in extra.items()},
        "log": str(server.log_path),
        "levels": {},
    }
    phases["ours"] = record
    log(f"ours: starting textgen serve on port {port}")
    try:
        server.start()
        assert server.proc is not None
        record["startup_s"] = round(server.wait_healthy(args.startup_timeout), 2)
        record["info"] = server_info(server.base_url)
        send = ours_stream_sender(server.base_url)
        rss_level = 64 if 64 in plan.levels else max(plan.levels, default=0)

        async def body() -> None:
            assert server.proc is not None
            max_conn = max([*plan.levels, plan.mixed_concurrency, WARMUP_BURST]) + 8
            async with make_client(max_conn, args.phase_timeout) as client:
                errors = await warm_up(client, send, prompts, WARMUP_BURST, log, "ours", args.phase_timeout)
                if errors:
                    raise ServerError(f"warm-up failed: {errors[0]}")
                offset = 0
                for conc in plan.levels:
                    jobs = jobs_for(prompts, plan.level_requests(conc), plan.new_tokens, offset)
                    offset += len(jobs)
                    log(f"ours c={conc}: {len(jobs)} requests")
                    with RssSampler(server.proc.pid) as rss:
                        res = await closed_loop(
                            client,
                            send,
                            jobs,
                            conc,
                            args.phase_timeout,
                            ProgressPrinter(f"ours c={conc}", log),
                        )
                    phase = from_records(f"ours: textgen serve c={conc}", conc, res.records, res.wall_s)
                    phase.extra["peak_rss_bytes"] = rss.peak_bytes
                    record["levels"][str(conc)] = phase.to_json()
                    if conc == rss_level:
                        budget, source = kv_budget(info, extra, record["info"])
                        record["memory"] = {
                            "level": conc,
                            "peak_rss_bytes": rss.peak_bytes,
                            "model_bytes": info.param_bytes,
                            "kv_budget_bytes": budget,
                            "kv_budget_source": source,
                            "kv_workload_bytes": conc * (PROMPT_TOKENS + plan.new_tokens) * info.kv_bytes_per_token(),
                            "rss_samples": rss.samples,
                        }
                    if res.timed_out:
                        log(f"ours c={conc}: phase timed out after {args.phase_timeout:.0f}s")

                mixed_jobs = [Job(i, prompts[i % len(prompts)], n, n) for i, n in enumerate(lengths)]
                conc = plan.mixed_concurrency
                log(f"mixed ours: {len(mixed_jobs)} requests, {conc} clients")
                res = await closed_loop(
                    client, send, mixed_jobs, conc, args.phase_timeout, ProgressPrinter("mixed ours", log)
                )
                phase = from_records(f"mixed ours: textgen serve c={conc}", conc, res.records, res.wall_s)
                # Latency from the start of the run (as for static batching), not from the send.
                done = {r.index: r.done for r in res.records if r.error is None and r.done is not None}
                quarter = [done[i] for i in shortest_quarter(lengths) if i in done]
                q50 = percentile(quarter, 50)
                phase.extra["shortest_quarter_p50_s"] = None if q50 is None else round(q50, 4)
                phase.extra["requested_tokens"] = sum(lengths)
                phases.setdefault("mixed", {})["ours"] = phase.to_json()

        asyncio.run(body())
    finally:
        server.stop()
        log("ours: stopped")


# ---------------------------------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.from_args(args)
    log = Log()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        log(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work competes, numbers will be noisy")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict[str, Any] = {"meta": meta(args, plan), "phases": {}}
    out: Path = args.out
    log_dir = out.parent / "logs"

    model_dir = args.model_dir or default_model_dir(args.seed)
    log(f"model: {model_dir} (built on first use)")
    info = ensure_model(model_dir, seed=args.seed)
    results["model"] = info.to_json()
    n_prompts = max(256, plan.mixed_requests)
    pairs = make_prompts(info.path, n_prompts, PROMPT_TOKENS)
    texts = [t for t, _ in pairs]
    ids = [i for _, i in pairs]
    rng = random.Random(args.seed)
    lengths = [rng.randint(MIXED_MIN, plan.mixed_max) for _ in range(plan.mixed_requests)]
    results["meta"]["mixed_lengths"] = lengths
    log(
        f"plan: baseline {plan.baseline_requests} req, ceiling batch {plan.ceiling_batch}, "
        f"levels {plan.levels}, "
        f"peer {'on' if plan.run_peer else 'off'}, mixed {plan.mixed_requests} req"
    )

    try:
        run_phases(results, info, plan, texts, ids, lengths, args, log, log_dir)
    except (KeyboardInterrupt, SystemExit):
        results["meta"]["interrupted"] = True
        log(f"interrupted: writing what was measured to {out}")
        write_json(out, results, log)
        print_peers(results, out, log)
        raise
    ratios = compute_ratios(results, RSS_ALLOWANCE_BYTES)
    results["ratios"] = [r.to_json() for r in ratios]
    write_json(out, results, log)
    if not args.peers_only:  # its table and ratios would be all SKIP
        print(render(results, ratios))
    print_peers(results, out, log)
    start_load, end_load = results["meta"]["loadavg_start"][0], results["meta"]["loadavg_end"][0]
    busy = " BUSY MACHINE: not a measurement" if max(start_load, end_load) > BUSY_LOAD else ""
    print(
        f"\nwrote {out} ({results['meta']['total_s']:.0f} s; load average {start_load:.1f} at start, "
        f"{end_load:.1f} at end, {os.cpu_count()} CPUs){busy}"
    )
    return 0


def print_peers(results: dict[str, Any], out: Path, log: Log) -> None:
    """The peer table and ratios (bench/peer_report.py), also saved in the JSON."""
    peers = results.get("peers") or {}
    if peers.get("contenders") or peers.get("error"):
        from bench.peer_report import peer_ratios, render_peers

        peer_list = peer_ratios(peers, (results["phases"].get("peer") or {}).get("tok_per_s"))
        peers["ratios"] = [r.to_json() for r in peer_list]
        write_json(out, results, log)
        print()
        print(render_peers(peers, peer_list))
    elif peers.get("skipped"):
        print(f"\npeers (llama.cpp, vLLM, CTranslate2): skipped ({peers['skipped']})")


def write_json(out: Path, results: dict[str, Any], log: Log) -> None:
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    results["meta"]["total_s"] = round(time.monotonic() - log.start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def run_phases(
    results: dict[str, Any],
    info: ModelInfo,
    plan: Plan,
    texts: list[str],
    ids: list[list[int]],
    lengths: list[int],
    args: argparse.Namespace,
    log: Log,
    log_dir: Path,
) -> None:
    """In-process first, then the peer, then ours: never two at once."""
    if not args.skip_inprocess:
        run_inprocess(results, info, plan, ids, lengths, log)
    if plan.run_peer:
        guarded(results["phases"], "peer", log, lambda: run_peer(results, info, plan, texts, args, log, log_dir))
    else:
        results["phases"]["peer"] = {"skipped": "--quick without --peer" if not args.skip_peer else "--skip-peer"}
    if not args.skip_ours:
        guarded(
            results["phases"],
            "ours",
            log,
            lambda: run_ours(results, info, plan, texts, lengths, args, log, log_dir),
        )
    if plan.peer_rounds > 0:
        guarded(results, "peers", log, lambda: run_peers(results, info, plan, texts, lengths, args, log, log_dir))
    else:
        results["peers"] = {"skipped": "--skip-peers"}


def run_peers(
    results: dict[str, Any],
    info: ModelInfo,
    plan: Plan,
    texts: list[str],
    lengths: list[int],
    args: argparse.Namespace,
    log: Log,
    log_dir: Path,
) -> None:
    """llama.cpp, vLLM and CTranslate2 against textgen serve, alternated in rounds (bench/peer_rounds.py)."""
    from bench.peer_rounds import NO_PEER, build_workload, run_rounds, split_available
    from bench.peers_build import PeerPaths, cache_root

    paths = PeerPaths(cache_root(), info.path)
    only = {k.strip() for k in args.peers.split(",") if k.strip()} if args.peers else None
    phases = {k.strip() for k in args.peer_phases.split(",") if k.strip()} if args.peer_phases else None
    live, skipped = split_available(paths, log, only, phases)
    if not any(c.kind != "textgen" for c in live):
        log(f"peers: {NO_PEER}")
        results["peers"] = {"rounds": 0, "skipped": skipped, "error": NO_PEER}
        return
    mixed = lengths[:32] if plan.quick else lengths[:64]
    workload = build_workload(info.path, texts, plan.new_tokens, plan.quick, mixed)
    section: dict[str, Any] = {"skipped": skipped}
    results["peers"] = section
    run_rounds(
        info.path,
        paths,
        live,
        workload,
        plan.peer_rounds,
        log,
        log_dir,
        args.startup_timeout,
        args.phase_timeout,
        section,
    )


if __name__ == "__main__":
    sys.exit(main())
