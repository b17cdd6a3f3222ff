"""CTranslate2 as a benchmark peer, in its own process (so its peak RSS is its own):
`python -m bench.ct2_worker SPEC.json OUT.json`.

SPEC: {"model": dir, "threads": 2, "mode": "sequential" | "batch", "batch": 32,
"prompts": [[token, ...], ...], "new_tokens": [n, ...], "static_prompt": [token, ...] | null}.
OUT: {"load_s", "wall_s", "records": [[sent_s, first_token_s, done_s, tokens], ...], "ids": [[id, ...], ...]}.

How this compares with the HTTP peers (there is no server, tokenizer or network here):
- "sequential" (the 1-client phase): one `generate_tokens` call per prompt, one after another;
  TTFT is the first yielded token, from the call.
- "batch" (32 clients): static batches of `batch` prompts through `generate_batch` with a per-token
  callback; a request's TTFT is its first token from the start of its batch, and each request
  stops at its own length (the callback returns True). A batch starts when the previous one ends,
  as a closed loop whose clients all finish together would.
- `static_prompt` (the shared-prefix phase) is CTranslate2's own prompt cache
  (`cache_static_prompt=True`), primed by one untimed call, as the servers' caches are by warm-up.
Greedy (`sampling_topk=1`), EOS suppressed with `min_length` = the request's length.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import ctranslate2

    t_load = time.perf_counter()
    gen = ctranslate2.Generator(spec["model"], device="cpu", inter_threads=1, intra_threads=int(spec["threads"]))
    load_s = time.perf_counter() - t_load
    prompts: list[list[str]] = spec["prompts"]
    lengths: list[int] = spec["new_tokens"]
    static: list[str] | None = spec.get("static_prompt")
    common: dict[str, Any] = {"sampling_topk": 1, "include_prompt_in_result": False}
    if static:
        common["static_prompt"] = static
        common["cache_static_prompt"] = True
    gen.generate_batch([prompts[0]], max_length=4, min_length=4, **common)  # warm-up (and prime the cache)
    records: list[list[float | int | None]] = []
    ids: list[list[int]] = []
    t0 = time.perf_counter()
    if spec["mode"] == "sequential":
        for prompt, n in zip(prompts, lengths, strict=True):
            sent = time.perf_counter() - t0
            first: float | None = None
            out: list[int] = []
            for step in gen.generate_tokens(prompt, max_length=n, min_length=n, sampling_topk=1):
                if first is None:
                    first = time.perf_counter() - t0
                out.append(step.token_id)
            records.append([sent, first, time.perf_counter() - t0, len(out)])
            ids.append(out)
    else:
        size = int(spec["batch"])
        for start in range(0, len(prompts), size):
            chunk, want = prompts[start : start + size], lengths[start : start + size]
            sent = time.perf_counter() - t0
            firsts: list[float | None] = [None] * len(chunk)
            dones: list[float | None] = [None] * len(chunk)
            outs: list[list[int]] = [[] for _ in chunk]

            def on_token(
                step: Any, want: list[int] = want, firsts: Any = firsts, dones: Any = dones, outs: Any = outs
            ) -> bool:
                now = time.perf_counter() - t0
                i = step.batch_id
                if firsts[i] is None:
                    firsts[i] = now
                outs[i].append(step.token_id)
                if len(outs[i]) >= want[i]:
                    dones[i] = now
                    return True
                return False

            gen.generate_batch(chunk, max_length=max(want), min_length=max(want), callback=on_token, **common)
            end = time.perf_counter() - t0
            for i in range(len(chunk)):
                records.append([sent, firsts[i], dones[i] if dones[i] is not None else end, len(outs[i])])
            ids.extend(outs)
    return {"load_s": load_s, "wall_s": time.perf_counter() - t0, "records": records, "ids": ids}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
