"""llama.cpp's `llama-server` as a benchmark peer: its command line and its `/completion` client.

Flags follow ../shared/notes/peers.md: `-np 32 -c 8192 -t 2 -tb 2 -cb` (32 slots of 256 tokens,
2 compute threads, continuous batching); `kv_f32` adds `-ctk f32 -ctv f32` (same numerics as fp32
torch; llama.cpp's default KV cache is f16).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench.clients import Job, Sender
from bench.stats import RequestRecord

SLOTS = 32
CONTEXT = 8192  # 32 slots x 256 tokens: the 1- and 32-client phases (prompt 32 + 64 new)
LONG_CONTEXT = 16384  # 32 x 512: the shared-prefix (~330 + 32) and mixed-length (32 + up to 256) phases
THREADS = 2


def server_cmd(binary: Path, gguf: Path, port: int, *, kv_f32: bool, context: int = CONTEXT) -> list[str]:
    """The `llama-server` command line, listening on 127.0.0.1:`port`."""
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(SLOTS),
        "-c",
        str(context),
        "-t",
        str(THREADS),
        "-tb",
        str(THREADS),
        "-cb",
    ]
    if kv_f32:
        cmd += ["-ctk", "f32", "-ctv", "f32"]
    return cmd


def completion_body(prompt_ids: list[int], n_predict: int, *, stream: bool, cache_prompt: bool) -> dict[str, Any]:
    """`POST /completion`: greedy (temperature 0), EOS ignored, exactly `n_predict` tokens. The prompt
    goes as token ids, so both servers see the same ids whatever llama.cpp's BOS setting."""
    return {
        "prompt": prompt_ids,
        "n_predict": n_predict,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": cache_prompt,
        "stream": stream,
        "return_tokens": True,
    }


def parse_event(line: str) -> dict[str, Any] | None:
    """One SSE line of a streamed `/completion` answer: its JSON, or None for other lines."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    event = json.loads(payload)
    return event if isinstance(event, dict) else None


def event_tokens(event: dict[str, Any]) -> int:
    """Tokens an event carries: its `tokens` list (return_tokens), else 1 when it has content."""
    tokens = event.get("tokens")
    if isinstance(tokens, list):
        return len(tokens)
    return 1 if event.get("content") else 0


def completion_sender(base_url: str, ids: dict[str, list[int]], *, cache_prompt: bool) -> Sender:
    """Streams `/completion`; TTFT is the first event carrying a token, the count is the final
    event's `tokens_predicted` (else the tokens counted). `ids` maps each prompt text to its ids."""

    async def send(client: httpx.AsyncClient, job: Job, rec: RequestRecord, t0: float) -> None:
        body = completion_body(ids[job.prompt], job.max_new_tokens, stream=True, cache_prompt=cache_prompt)
        counted = 0
        async with client.stream("POST", base_url + "/completion", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                event = parse_event(line)
                if event is None:
                    continue
                if event.get("error"):
                    raise RuntimeError(f"stream error: {str(event['error'])[:200]}")
                n = event_tokens(event)
                if n and rec.first_token is None:
                    rec.first_token = time.perf_counter() - t0
                counted += n
                if event.get("stop"):
                    counted = int(event.get("tokens_predicted", counted))
                    break
        rec.generated_tokens = counted
        rec.done = time.perf_counter() - t0

    return send


def greedy_tokens(base_url: str, prompt_ids: list[int], n_predict: int, timeout_s: float) -> list[int]:
    """One non-streamed greedy completion's token ids."""
    body = completion_body(prompt_ids, n_predict, stream=False, cache_prompt=False)
    resp = httpx.post(base_url + "/completion", json=body, timeout=timeout_s, trust_env=False)
    resp.raise_for_status()
    return [int(t) for t in resp.json()["tokens"]]
