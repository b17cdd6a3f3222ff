"""The real peers, alternated in rounds on one model and workload: `textgen serve` (fp32; bf16;
prefix cache off; int8 and int4 weight-only), llama.cpp's `llama-server` (f32 weights with its
default f16 KV cache and with f32 KV; q8_0 and q4_0 weights), vLLM's CPU build (fp32) and
CTranslate2 (in-process, in its own process). Part of `python -m bench.run`; the peers come from
`make bench-peers` (bench/peers_build.py) and any that is missing is skipped with the reason.

Phases (every contender runs those listed for it in `contenders`):
- `c1`, `c32`: 1 and 32 closed-loop clients, 32-token prompts, `new_tokens` each (greedy, EOS off).
- `prefix`: 32 clients; a 300-token system prompt shared by all, then a short question (16 tokens);
  32 new tokens. One untimed request with the system prompt goes first (a warm service has seen
  its system prompt). llama.cpp gets `cache_prompt: true` here (its own prompt cache, on by
  default); everywhere else `cache_prompt: false`.
- `mixed`: 32 clients, new tokens uniform in 8..mixed_max (bench.run's lengths).
Each contender's best round is reported, per metric (highest tok/s, lowest TTFT/ITL/RSS/latency).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench import llama, vllm
from bench.clients import Job, Sender, closed_loop, make_client, ours_stream_sender
from bench.peers_build import PeerPaths
from bench.servers import RssSampler, Server, ServerError, free_port, venv_script
from bench.stats import RequestRecord, from_records, percentile, shortest_quarter

SYSTEM_TOKENS = 300
QUESTION_TOKENS = 16
PREFIX_NEW_TOKENS = 32
CLIENTS = 32
WARMUP = 32


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # "textgen" | "llama" | "vllm" | "ct2"
    phases: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # textgen: extra TEXTGEN_* settings
    kv_f32: bool = False  # llama: -ctk f32 -ctv f32
    gguf: str = "f32"  # llama: the weights' GGUF type (bench.peers_build.GGUF_TYPES)


ALL_PHASES = ("c1", "c32", "prefix", "mixed")
SPEED = ("c1", "c32")
CONTENDERS = [
    Contender("textgen", "textgen serve fp32", "textgen", ALL_PHASES),
    Contender("textgen_bf16", "textgen serve bf16", "textgen", ("c32",), (("TEXTGEN_DTYPE", "bfloat16"),)),
    Contender(
        "textgen_nocache",
        "textgen serve, prefix cache off",
        "textgen",
        ("prefix",),
        (("TEXTGEN_PREFIX_CACHE", "false"),),
    ),
    Contender(
        "textgen_int8", "textgen serve int8-weight-only", "textgen", SPEED, (("TEXTGEN_QUANTIZE", "int8-weight-only"),)
    ),
    Contender(
        "textgen_int4", "textgen serve int4-weight-only", "textgen", SPEED, (("TEXTGEN_QUANTIZE", "int4-weight-only"),)
    ),
    Contender("llama_f16", "llama-server (defaults: f16 KV)", "llama", ALL_PHASES),
    Contender("llama_f32", "llama-server, f32 KV", "llama", ALL_PHASES, kv_f32=True),
    # Quantized as llama.cpp users run them: its default f16 KV cache.
    Contender("llama_q8_0", "llama-server q8_0", "llama", SPEED, gguf="q8_0"),
    Contender("llama_q4_0", "llama-server q4_0", "llama", SPEED, gguf="q4_0"),
    Contender("vllm", "vLLM CPU fp32", "vllm", ALL_PHASES),
    Contender("ct2", "CTranslate2 f32 (in-process)", "ct2", ALL_PHASES),
]


@dataclass
class Workload:
    """Prompts as text (textgen tokenizes them) with their ids (llama.cpp gets ids, CTranslate2 tokens)."""

    texts: list[str]
    ids: dict[str, list[int]]
    tokens: dict[str, list[str]]
    new_tokens: int
    c1_requests: int
    c32_requests: int
    prefix_texts: list[str]
    system_ids: list[int]
    question_ids: dict[str, list[int]]  # prefix prompt text -> the ids after the system prompt
    mixed_lengths: list[int]

    def jobs(self, phase: str) -> list[Job]:
        if phase == "c1":
            return [Job(i, self.texts[i], self.new_tokens, self.new_tokens) for i in range(self.c1_requests)]
        if phase == "c32":
            return [Job(i, self.texts[i], self.new_tokens, self.new_tokens) for i in range(self.c32_requests)]
        if phase == "prefix":
            return [Job(i, t, PREFIX_NEW_TOKENS, PREFIX_NEW_TOKENS) for i, t in enumerate(self.prefix_texts)]
        if phase == "mixed":
            return [Job(i, self.texts[i % len(self.texts)], n, n) for i, n in enumerate(self.mixed_lengths)]
        raise ValueError(phase)

    def concurrency(self, phase: str) -> int:
        return 1 if phase == "c1" else CLIENTS


def build_workload(
    model_dir: Path, texts: list[str], new_tokens: int, quick: bool, mixed_lengths: list[int]
) -> Workload:
    from transformers import AutoTokenizer

    from bench.model import make_prompts

    tok = AutoTokenizer.from_pretrained(model_dir)
    system_text, system_ids = make_prompts(model_dir, 1, SYSTEM_TOKENS)[0]
    questions = make_prompts(model_dir, 32 if quick else 64, QUESTION_TOKENS)
    prefix_texts = [f"{system_text}\n{q}" for q, _ in questions]
    question_ids = {
        t: tok("\n" + q, add_special_tokens=False)["input_ids"]
        for t, (q, _) in zip(prefix_texts, questions, strict=True)
    }
    ids = {t: tok(t, add_special_tokens=False)["input_ids"] for t in [*texts, *prefix_texts]}
    tokens = {t: tok.convert_ids_to_tokens(i) for t, i in ids.items()}
    for t, q in question_ids.items():
        tokens["q:" + t] = tok.convert_ids_to_tokens(q)
    tokens["system"] = tok.convert_ids_to_tokens(system_ids)
    return Workload(
        texts=texts,
        ids=ids,
        tokens=tokens,
        new_tokens=new_tokens,
        c1_requests=3 if quick else 8,
        c32_requests=32 if quick else 64,
        prefix_texts=prefix_texts,
        system_ids=system_ids,
        question_ids=question_ids,
        mixed_lengths=mixed_lengths,
    )


# ---------------------------------------------------------------------------------------------
# pure parts: per-phase summaries, best rounds, availability


def itl(rec: RequestRecord) -> float | None:
    """Mean inter-token latency of one request: (last token - first token) / (tokens - 1)."""
    if rec.error or rec.first_token is None or rec.done is None or rec.generated_tokens < 2:
        return None
    return (rec.done - rec.first_token) / (rec.generated_tokens - 1)


def summarize(
    name: str, concurrency: int, records: list[RequestRecord], wall_s: float, peak_rss: int | None
) -> dict[str, Any]:
    """One phase of one round: bench.stats' summary plus ITL p50 (of per-request means), the
    shortest-quarter p50 latency (mixed phase) and the peak RSS of the process tree."""
    phase = from_records(name, concurrency, records, wall_s)
    out = phase.to_json()
    itls = [v for r in records if (v := itl(r)) is not None]
    p = percentile(itls, 50)
    out["itl_p50_s"] = None if p is None else round(p, 5)
    done = {r.index: r.done for r in records if r.error is None and r.done is not None}
    quarter = [done[i] for i in shortest_quarter([r.max_new_tokens for r in records]) if i in done]
    q50 = percentile(quarter, 50)
    out["shortest_quarter_p50_s"] = None if q50 is None else round(q50, 4)
    out["peak_rss_bytes"] = peak_rss
    return out


BEST_MAX = ("tok_per_s",)
BEST_MIN = ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "e2e_p50_s", "shortest_quarter_p50_s", "peak_rss_bytes")


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Best of a phase's rounds, each metric on its own: highest tok/s, lowest latencies and RSS.
    Rounds with failed requests do not count when one without failures exists."""
    clean = [r for r in rounds if not r.get("errors") and not r.get("error")] or [
        r for r in rounds if not r.get("error")
    ]
    if not clean:
        return {"error": rounds[-1].get("error", "no rounds") if rounds else "no rounds"}
    best: dict[str, Any] = {"rounds": len(clean)}
    for key in BEST_MAX:
        vals = [r[key] for r in clean if r.get(key) is not None]
        best[key] = max(vals) if vals else None
    for key in BEST_MIN:
        vals = [r[key] for r in clean if r.get(key) is not None]
        best[key] = min(vals) if vals else None
    best["errors"] = min(r.get("errors", 0) for r in clean)
    return best


def availability(c: Contender, paths: PeerPaths) -> str | None:
    """None when `c` can run here, else why not (and how to get it)."""
    hint = "run `make bench-peers` (python -m bench.peers_build)"
    if c.kind == "textgen":
        return None if venv_script("textgen") else "the `textgen` CLI is not installed"
    if c.kind == "llama":
        if not paths.llama_server.exists():
            return f"llama-server not built at {paths.llama_server}: {hint}"
        gguf = paths.gguf_of(c.gguf)
        if not gguf.exists():
            return f"no {c.gguf} GGUF of the bench model at {gguf}: {hint}"
        return None
    if c.kind == "vllm":
        if not paths.vllm_marker.exists():
            return f"vLLM's CPU build not installed at {paths.vllm_venv}: {hint}"
        return None
    if c.kind == "ct2":
        if importlib.util.find_spec("ctranslate2") is None:
            return "ctranslate2 is not installed: pip install -e '.[bench]', then " + hint
        if not (paths.ct2 / "model.bin").exists():
            return f"no CTranslate2 model at {paths.ct2}: {hint}"
        return None
    return f"unknown kind {c.kind}"


def round_order(contenders: list[Contender], round_index: int) -> list[Contender]:
    """ABC, CBA, ABC...: reversing every other round spreads slow drift of the machine evenly."""
    return list(contenders) if round_index % 2 == 0 else list(reversed(contenders))


def token_matches(reference: list[list[int]], other: list[list[int]]) -> int:
    """How many prompts gave identical greedy token ids."""
    return sum(1 for a, b in zip(reference, other, strict=False) if a == b)


def metric_lines(text: str, prefix: str) -> dict[str, float]:
    """Prometheus text: the samples whose name starts with `prefix` (labels dropped, summed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------------------------
# running


Log = Callable[[str], None]


@dataclass
class Runner:
    model_dir: Path
    paths: PeerPaths
    workload: Workload
    log: Log
    log_dir: Path
    startup_timeout: float
    phase_timeout: float
    results: dict[str, Any] = field(default_factory=dict)
    greedy: dict[str, list[list[int]]] = field(default_factory=dict)

    def record(self, key: str, round_index: int, phase: str, value: dict[str, Any]) -> None:
        rounds = self.results.setdefault(key, {}).setdefault("rounds", {}).setdefault(phase, [])
        value["round"] = round_index
        rounds.append(value)
        if "tok_per_s" in value:
            ttft = value.get("ttft_p50_s")
            ttft_ms = "-" if ttft is None else f"{ttft * 1e3:.0f}"
            self.log(
                f"  {key} {phase}: {value['tok_per_s']:.1f} tok/s, TTFT p50 {ttft_ms} ms, errors {value['errors']}"
            )

    # -- HTTP servers ------------------------------------------------------------------------

    async def _http_phase(
        self, server: Server, send: Sender, key: str, phase: str, client: httpx.AsyncClient
    ) -> dict[str, Any]:
        assert server.proc is not None
        jobs = self.workload.jobs(phase)
        conc = self.workload.concurrency(phase)
        with RssSampler(server.proc.pid) as rss:
            res = await closed_loop(client, send, jobs, conc, self.phase_timeout)
        return summarize(f"{key} {phase}", conc, res.records, res.wall_s, rss.peak_bytes)

    async def _warm(self, send: Sender, client: httpx.AsyncClient) -> None:
        texts = self.workload.texts
        warm = [Job(i, texts[i % len(texts)], 8, 8) for i in range(WARMUP)]
        res = await closed_loop(client, send, warm[:2], 1, self.phase_timeout)
        res2 = await closed_loop(client, send, warm, WARMUP, self.phase_timeout)
        errors = [r.error for r in res.records + res2.records if r.error]
        if errors:
            raise ServerError(f"warm-up failed: {errors[0]}")

    async def _prime(self, send: Sender, client: httpx.AsyncClient) -> None:
        """One untimed request carrying the system prompt (the last question, not timed after)."""
        text = self.workload.prefix_texts[-1]
        await closed_loop(client, send, [Job(0, text, 4, 4)], 1, self.phase_timeout)

    def _run_server(
        self,
        c: Contender,
        round_index: int,
        phases: list[str],
        cmd: list[str],
        env: dict[str, str],
        make_sender: Callable[[str, str], Sender],
        after: Callable[[str, str], None] | None = None,
        startup_timeout: float | None = None,
    ) -> None:
        port = int(cmd[cmd.index("--port") + 1])
        server = Server(c.label, cmd, port, self.log_dir / f"{c.key}-r{round_index + 1}-{phases[0]}.log", env)
        self.results.setdefault(c.key, {})["command"] = " ".join(cmd)
        try:
            server.start()
            started = server.wait_healthy(startup_timeout or self.startup_timeout)
            self.results[c.key].setdefault("startup_s", []).append(round(started, 1))

            async def body() -> None:
                async with make_client(CLIENTS + 8, self.phase_timeout) as client:
                    await self._warm(make_sender(server.base_url, "warm"), client)
                    for phase in phases:
                        if phase == "prefix":
                            await self._prime(make_sender(server.base_url, phase), client)
                        value = await self._http_phase(
                            server, make_sender(server.base_url, phase), c.key, phase, client
                        )
                        if phase == "prefix" and c.kind == "textgen":
                            value["prefix_cache_metrics"] = prefix_metrics(server.base_url)
                        self.record(c.key, round_index, phase, value)

            asyncio.run(body())
            if after is not None:
                after(server.base_url, "after")
        finally:
            server.stop()

    def run_textgen(self, c: Contender, round_index: int) -> None:
        from bench.run import server_env

        exe = venv_script("textgen")
        assert exe is not None
        port = free_port()
        extra = {"TEXTGEN_DEVICE": "cpu", "TEXTGEN_DTYPE": "float32", "TEXTGEN_DRAIN_DELAY": "0", **dict(c.env)}
        cmd = [exe, "serve", "--model", str(self.model_dir), "--host", "127.0.0.1", "--port", str(port)]
        self.results.setdefault(c.key, {})["env"] = extra

        def sender(base_url: str, phase: str) -> Sender:
            return ours_stream_sender(base_url)

        after = self._greedy_textgen if c.key == "textgen" and round_index == 0 else None
        self._run_server(c, round_index, list(c.phases), cmd, server_env(extra), sender, after)

    def run_llama(self, c: Contender, round_index: int) -> None:
        from bench.run import server_env

        groups = [
            (llama.CONTEXT, [p for p in c.phases if p in ("c1", "c32")]),
            (llama.LONG_CONTEXT, [p for p in c.phases if p in ("prefix", "mixed")]),
        ]
        for context, phases in groups:
            if not phases:
                continue
            cmd = llama.server_cmd(
                self.paths.llama_server, self.paths.gguf_of(c.gguf), free_port(), kv_f32=c.kv_f32, context=context
            )

            def sender(base_url: str, phase: str) -> Sender:
                return llama.completion_sender(base_url, self.workload.ids, cache_prompt=phase == "prefix")

            greedy = c.key == "llama_f32" and round_index == 0 and context == llama.CONTEXT
            after = self._greedy_llama if greedy else None
            self._run_server(c, round_index, phases, cmd, server_env(), sender, after)
            self.results[c.key][f"command_c{context}"] = " ".join(cmd)

    def run_vllm(self, c: Contender, round_index: int) -> None:
        from bench.run import server_env

        cmd = vllm.server_cmd(self.paths.vllm_python, self.model_dir, free_port())
        env = vllm.server_env(server_env(), self.paths.vllm_venv)
        self.results.setdefault(c.key, {})["env"] = {
            k: env[k] for k in ("LD_PRELOAD", "VLLM_CPU_OMP_THREADS_BIND") if k in env
        }

        def sender(base_url: str, phase: str) -> Sender:
            return vllm.completion_sender(base_url, self.workload.ids)

        after = self._greedy_vllm if round_index == 0 else None
        # Its first start compiles the model: a longer wait than the other servers get.
        timeout = max(self.startup_timeout, vllm.STARTUP_TIMEOUT_S)
        self._run_server(c, round_index, list(c.phases), cmd, env, sender, after, timeout)

    # -- greedy outputs ------------------------------------------------------------------------

    def _greedy_prompts(self) -> list[str]:
        return self.workload.texts[:CLIENTS]

    def _greedy_textgen(self, base_url: str, _: str) -> None:
        async def one(client: httpx.AsyncClient, text: str) -> list[int]:
            n = self.workload.new_tokens
            body = {"inputs": text, "parameters": {"max_new_tokens": n, "min_new_tokens": n, "details": True}}
            resp = await client.post(base_url + "/generate", json=body)
            resp.raise_for_status()
            return [int(t["id"]) for t in resp.json()["details"]["tokens"]]

        async def body() -> list[list[int]]:
            async with make_client(CLIENTS + 8, self.phase_timeout) as client:
                return list(await asyncio.gather(*(one(client, t) for t in self._greedy_prompts())))

        self.greedy["textgen"] = asyncio.run(body())

    def _greedy_llama(self, base_url: str, _: str) -> None:
        async def one(client: httpx.AsyncClient, text: str) -> list[int]:
            body = llama.completion_body(
                self.workload.ids[text], self.workload.new_tokens, stream=False, cache_prompt=False
            )
            resp = await client.post(base_url + "/completion", json=body)
            resp.raise_for_status()
            return [int(t) for t in resp.json()["tokens"]]

        async def body() -> list[list[int]]:
            async with make_client(CLIENTS + 8, self.phase_timeout) as client:
                return list(await asyncio.gather(*(one(client, t) for t in self._greedy_prompts())))

        self.greedy["llama_f32"] = asyncio.run(body())

    def _greedy_vllm(self, base_url: str, _: str) -> None:
        async def one(client: httpx.AsyncClient, text: str) -> list[int]:
            body = vllm.completion_body(self.workload.ids[text], self.workload.new_tokens, stream=False)
            resp = await client.post(base_url + "/v1/completions", json=body)
            resp.raise_for_status()
            return vllm.response_token_ids(resp.json())

        async def body() -> list[list[int]]:
            async with make_client(CLIENTS + 8, self.phase_timeout) as client:
                return list(await asyncio.gather(*(one(client, t) for t in self._greedy_prompts())))

        self.greedy["vllm"] = asyncio.run(body())

    # -- CTranslate2 -----------------------------------------------------------------------------

    def ct2_spec(self, phase: str) -> dict[str, Any]:
        jobs = self.workload.jobs(phase)
        spec: dict[str, Any] = {
            "model": str(self.paths.ct2),
            "threads": llama.THREADS,
            "mode": "sequential" if phase == "c1" else "batch",
            "batch": CLIENTS,
            "new_tokens": [j.max_new_tokens for j in jobs],
            "static_prompt": None,
        }
        if phase == "prefix":
            spec["static_prompt"] = self.workload.tokens["system"]
            spec["prompts"] = [self.workload.tokens["q:" + j.prompt] for j in jobs]
        else:
            spec["prompts"] = [self.workload.tokens[j.prompt] for j in jobs]
        return spec

    def run_ct2(self, c: Contender, round_index: int) -> None:
        for phase in c.phases:
            with tempfile.TemporaryDirectory() as tmp:
                spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
                spec_path.write_text(json.dumps(self.ct2_spec(phase)))
                cmd = [sys.executable, "-m", "bench.ct2_worker", str(spec_path), str(out_path)]
                log_path = self.log_dir / "ct2.log"
                with log_path.open("ab") as log_file:
                    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
                    with RssSampler(proc.pid) as rss:
                        try:
                            rc = proc.wait(timeout=self.phase_timeout)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                            raise ServerError(
                                f"ctranslate2 {phase}: timed out after {self.phase_timeout:.0f}s"
                            ) from None
                if rc != 0:
                    raise ServerError(f"ctranslate2 worker exited with {rc}; see {log_path}")
                out = json.loads(out_path.read_text())
            jobs = self.workload.jobs(phase)
            records = ct2_records(jobs, out["records"])
            value = summarize(f"ct2 {phase}", self.workload.concurrency(phase), records, out["wall_s"], rss.peak_bytes)
            value["load_s"] = round(out["load_s"], 2)
            self.record(c.key, round_index, phase, value)
            if phase == "c32" and round_index == 0:
                self.greedy["ct2"] = out["ids"][:CLIENTS]
        self.results.setdefault(c.key, {})["command"] = (
            "python -m bench.ct2_worker (ctranslate2.Generator, intra_threads=2)"
        )


def ct2_records(jobs: list[Job], rows: list[list[Any]]) -> list[RequestRecord]:
    """The worker's [sent, first_token, done, tokens] rows as bench records."""
    out = []
    for job, (sent, first, done, tokens) in zip(jobs, rows, strict=True):
        out.append(RequestRecord(job.index, job.max_new_tokens, sent, first, done, int(tokens)))
    return out


def prefix_metrics(base_url: str) -> dict[str, float] | str:
    try:
        text = httpx.get(base_url + "/metrics", timeout=10.0, trust_env=False).text
    except httpx.HTTPError as exc:
        return f"unavailable: {exc}"
    found = metric_lines(text, "textgen_prefix_cache")
    return found or "no textgen_prefix_cache_* metrics: this server has no prefix cache"


def split_available(
    paths: PeerPaths, log: Log, only: set[str] | None = None, phases: set[str] | None = None
) -> tuple[list[Contender], dict[str, str]]:
    """The contenders that can run here (of `only`, when given; each with its phases among
    `phases`, when given), and why each other one cannot."""
    live: list[Contender] = []
    skipped: dict[str, str] = {}
    for c in CONTENDERS:
        if phases is not None:
            c = replace(c, phases=tuple(p for p in c.phases if p in phases))
        if only is not None and c.key not in only:
            reason: str | None = "not selected (--peers)"
        elif not c.phases:
            reason = "none of its phases selected (--peer-phases)"
        else:
            reason = availability(c, paths)
        if reason:
            log(f"peers: {c.label} skipped: {reason}")
            skipped[c.key] = reason
        else:
            live.append(c)
    return live, skipped


NO_PEER = "no peer available (llama-server, vLLM, CTranslate2): run `make bench-peers`"


def run_rounds(
    model_dir: Path,
    paths: PeerPaths,
    live: list[Contender],
    workload: Workload,
    rounds: int,
    log: Log,
    log_dir: Path,
    startup_timeout: float,
    phase_timeout: float,
    section: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `live` contenders, `rounds` times, alternating the order; fills and returns the JSON
    section (`section`, when given, so that an interrupted run keeps what it measured)."""
    section = {} if section is None else section
    section.update({"rounds": rounds, "choices": CHOICES})
    runner = Runner(model_dir, paths, workload, log, log_dir, startup_timeout, phase_timeout)
    try:
        for r in range(rounds):
            for c in round_order(live, r):
                log(f"peers round {r + 1}/{rounds}: {c.label} ({', '.join(c.phases)})")
                t = time.monotonic()
                try:
                    run = {
                        "textgen": runner.run_textgen,
                        "llama": runner.run_llama,
                        "vllm": runner.run_vllm,
                        "ct2": runner.run_ct2,
                    }[c.kind]
                    run(c, r)
                except Exception as exc:  # noqa: BLE001 - a failed contender is reported, the rest still run
                    log(f"peers: {c.label} round {r + 1} FAILED: {type(exc).__name__}: {exc}")
                    for phase in c.phases:
                        runner.record(c.key, r, phase, {"error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                log(f"peers: {c.label} took {time.monotonic() - t:.0f}s")
    finally:  # also when interrupted: what was measured so far is summarized
        summarize_section(section, live, runner)
    return section


def summarize_section(section: dict[str, Any], live: list[Contender], runner: Runner) -> None:
    section["contenders"] = {}
    for c in live:
        entry = runner.results.get(c.key, {})
        entry["label"] = c.label
        entry["best"] = {phase: best_of(rs) for phase, rs in entry.get("rounds", {}).items()}
        section["contenders"][c.key] = entry
    section["greedy"] = greedy_summary(runner.greedy)


def greedy_summary(greedy: dict[str, list[list[int]]]) -> dict[str, Any]:
    ref = greedy.get("textgen")
    out: dict[str, Any] = {}
    for key in ("llama_f32", "vllm", "ct2"):
        other = greedy.get(key)
        if ref is None or other is None:
            out[key] = {"matched": None, "of": None, "note": "not measured"}
        else:
            out[key] = {"matched": token_matches(ref, other), "of": min(len(ref), len(other))}
    return out


CHOICES = {
    "llama_flags": "-np 32 -c 8192 -t 2 -tb 2 -cb (c1, c32); -c 16384 for prefix and mixed (prompts exceed 256 per slot)",
    "llama_request": "POST /completion, prompt as token ids, temperature 0, ignore_eos, n_predict, stream, return_tokens",
    "llama_cache_prompt": "false, except the shared-prefix phase (true: llama.cpp's own prompt cache)",
    "llama_quantized": "q8_0 from convert_hf_to_gguf.py --outtype q8_0, q4_0 from llama-quantize Q4_0 (output "
    "matrix q6_K, its default); both with llama.cpp's default f16 KV cache, as its users run them",
    "textgen_quantized": "TEXTGEN_QUANTIZE=int8-weight-only / int4-weight-only set alone, as a user would",
    "vllm": "vllm-cpu 0.32 in its own venv: python -m vllm.entrypoints.openai.api_server --dtype float32 "
    "--max-num-seqs 32 --max-model-len 1024 --kv-cache-memory-bytes 2560M, VLLM_CPU_OMP_THREADS_BIND=0-<cores-1>, "
    "TCMalloc + libiomp5 preloaded; POST /v1/completions with token ids, temperature 0, ignore_eos, max_tokens, "
    "stream (usage chunk for the count); its own prefix caching is on by default",
    "ct2": "in its own process; c1 = generate_tokens per prompt; 32 clients = static batches of 32 via generate_batch "
    "with a per-token callback (TTFT from the batch start); prefix phase uses static_prompt + cache_static_prompt",
    "best_round": "per metric: highest tok/s, lowest TTFT/ITL/latency/RSS over the rounds without failures",
    "itl": "per request (last token - first token) / (tokens - 1); p50 over requests",
    "rss": "peak RSS of the server's process tree (CTranslate2: its worker process) during the phase",
}
