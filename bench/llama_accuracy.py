"""llama.cpp's next-token distributions for bench.accuracy: its GGUFs of the model under test,
teacher-forced on fp32's continuations through `llama-server`.

For prompt p and continuation c, the distribution before c[k] comes from `POST /completion` with
the ids p + c[:k], `n_predict: 1` and `n_probs` = the vocabulary size: the server then returns the
softmax of the raw logits over the whole vocabulary (not after sampling), as log-probabilities.
The requests for one prompt go in order to one slot (`id_slot`) with `cache_prompt: true`, so each
evaluates one new token; the prompts run in parallel, one client per slot, so the server batches
them (2048 positions take 64 batched steps rather than 2048 lone ones).
The server runs with an f32 KV cache (`-ctk f32 -ctv f32`), so only the weights' type differs from
the fp32 reference; the f32 GGUF is the control (its KL must be ~0: same ids, same positions).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import llama
from bench.peers_build import PeerPaths, cache_root, convert_gguf
from bench.servers import Server, ServerError, free_port

LLAMA_MODES = {"llama.cpp-f32": "f32", "llama.cpp-q8_0": "q8_0", "llama.cpp-q4_0": "q4_0"}
FLOOR_LOGPROB = -100.0  # a probability the server rounds to 0 (JSON null or -inf) counts as e^-100
STARTUP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0


def probs_body(ids: list[int], vocab: int, slot: int = -1) -> dict[str, Any]:
    """One teacher-forced position: the distribution after `ids`, over all `vocab` tokens, on
    server slot `slot` (-1: any)."""
    return {
        "prompt": ids,
        "id_slot": slot,
        "n_predict": 1,
        "n_probs": vocab,
        "temperature": 0.0,
        "cache_prompt": True,
        "stream": False,
        "post_sampling_probs": False,
    }


def row_from_response(response: dict[str, Any], vocab: int) -> torch.Tensor:
    """Log-probabilities [vocab] from `/completion`'s first `completion_probabilities` entry
    (`top_logprobs`: [{id, logprob}, ...]). Raises ValueError when it does not cover the vocabulary."""
    probs = response.get("completion_probabilities") or []
    if not probs:
        raise ValueError("no completion_probabilities in the response (n_probs ignored?)")
    top = probs[0].get("top_logprobs") or []
    row = torch.full((vocab,), math.nan, dtype=torch.float64)
    for entry in top:
        value = entry.get("logprob")
        lp = FLOOR_LOGPROB if value is None or not math.isfinite(float(value)) else float(value)
        row[int(entry["id"])] = max(lp, FLOOR_LOGPROB)
    missing = int(torch.isnan(row).sum())
    if missing:
        raise ValueError(f"n_probs returned {len(top)} of {vocab} tokens ({missing} missing)")
    return row.float()


def availability(paths: PeerPaths) -> str | None:
    """None when llama-server is built, else why not."""
    if not paths.llama_server.exists():
        return f"llama-server not built at {paths.llama_server}: run `make bench-peers` (python -m bench.peers_build)"
    return None


def llama_log_probs(model_dir: Path, kind: str, prompts: list[list[int]], conts: list[list[int]]) -> torch.Tensor | str:
    """Log-probabilities [prompts, tokens, vocab] from llama.cpp's `kind` GGUF of `model_dir`
    (converted on first use), or a one-line reason why they cannot be had here."""
    paths = PeerPaths(cache_root(), model_dir)
    reason = availability(paths)
    if reason:
        return reason
    try:
        gguf = convert_gguf(paths, kind)
    except (SystemExit, OSError, RuntimeError) as exc:  # the converter exits with its message
        return f"could not convert {model_dir.name} to a {kind} GGUF: {str(exc)[-300:]}"
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    port = free_port()
    cmd = llama.server_cmd(paths.llama_server, gguf, port, kv_f32=True)
    log_path = Path(tempfile.gettempdir()) / f"textgen-accuracy-llama-{kind}.log"
    server = Server(f"llama-server {kind}", cmd, port, log_path, dict(os.environ))
    try:
        server.start()
        server.wait_healthy(STARTUP_TIMEOUT_S)
        rows: list[torch.Tensor | None] = [None] * len(prompts)

        def one_slot(slot: int) -> None:
            with httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
                for i in range(slot, len(prompts), llama.SLOTS):
                    p, c = prompts[i], conts[i]
                    per_prompt = []
                    for k in range(len(c)):
                        body = probs_body(p + c[:k], vocab, slot)
                        resp = client.post(server.base_url + "/completion", json=body)
                        if resp.status_code != 200:
                            raise ValueError(f"llama-server answered {resp.status_code}: {resp.text[:200]}")
                        per_prompt.append(row_from_response(resp.json(), vocab))
                    rows[i] = torch.stack(per_prompt)

        with ThreadPoolExecutor(max_workers=llama.SLOTS) as pool:
            for future in [pool.submit(one_slot, s) for s in range(min(llama.SLOTS, len(prompts)))]:
                future.result()
        return torch.stack([r for r in rows if r is not None])
    except (ServerError, ValueError, httpx.HTTPError) as exc:
        return f"{type(exc).__name__}: {str(exc)[-300:]}"
    finally:
        server.stop()
