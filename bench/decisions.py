"""Decisions served: decisions/s of `POST /v1/decisions` at 1 and 32 clients, each request 3
questions (a 3-way choice, a predicate, a 3-level score) about its own input, against two ways of
getting the same information from the same server:

- `one-prefill`: one `/v1/completions` per question whose prompt is the question's prompt followed
  by every option (max_tokens 1): the cost of prefilling the input plus the options once, a floor
  no exact scorer can beat by much;
- `completions`: the same answers through `/v1/completions` logprobs, one request per option
  (prompt + option, `echo` with `logprobs`, max_tokens 1), summed by the client: what a client of a
  server without /v1/decisions does (echoed prompt logprobs bypass the prefix cache).

A decision is one answered question. Each mode runs `--requests` requests per client, clients in
parallel; the figure is questions answered per second of wall time (best of `--rounds`).

    python -m bench.decisions [--model DIR] [--clients 1,32] [--requests 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from app.decisions.prompt import completion_prompt
from app.decisions.questions import parse_questions
from bench.model import default_model_dir, ensure_model
from bench.servers import Server, free_port, textgen_env

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench"
QUESTIONS: list[dict[str, Any]] = [
    {
        "type": "choice",
        "instructions": "Which department should handle this message?",
        "choices": [{"value": "billing"}, {"value": "shipping"}, {"value": "returns"}],
    },
    {"type": "predicate", "instructions": "The customer is angry."},
    {
        "type": "score",
        "instructions": "How urgent is it?",
        "levels": [{"label": "low"}, {"label": "medium"}, {"label": "high"}],
    },
]


def inputs(count: int) -> list[str]:
    items = ["lamp", "chair", "kite", "book", "cup", "bike", "coat", "clock"]
    return [
        f"Message {i}: hello, I ordered a {items[i % len(items)]} {i % 7 + 2} days ago and it has not arrived; "
        "the tracking page shows no update and I was charged already. Please tell me what happens next."
        for i in range(count)
    ]


async def decide(client: httpx.AsyncClient, url: str, text: str) -> int:
    r = await client.post(url + "/v1/decisions", json={"model": MODEL_NAME, "input": text, "questions": QUESTIONS})
    r.raise_for_status()
    return len(r.json()["answers"])


async def one_prefill(client: httpx.AsyncClient, url: str, text: str) -> int:
    for q in parse_questions(QUESTIONS, 64, 64):
        prompt = completion_prompt(text, q) + "".join(f" {o.text}\n" for o in q.options)
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        (await client.post(url + "/v1/completions", json=body)).raise_for_status()
    return len(QUESTIONS)


async def by_completions(client: httpx.AsyncClient, url: str, text: str) -> int:
    for q in parse_questions(QUESTIONS, 64, 64):
        prompt = completion_prompt(text, q)
        bodies = [
            {
                "model": MODEL_NAME,
                "prompt": prompt + f" {o.text}\n",
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": 0,
            }
            for o in q.options
        ]
        replies = await asyncio.gather(*(client.post(url + "/v1/completions", json=b) for b in bodies))
        for r in replies:
            r.raise_for_status()
            offsets = r.json()["choices"][0]["logprobs"]["text_offset"]
            assert offsets  # the option's logprobs are those at offsets >= len(prompt)
    return len(QUESTIONS)


MODES = {"decisions": decide, "one-prefill": one_prefill, "completions": by_completions}


async def measure(url: str, mode: str, clients: int, requests: int) -> float:
    texts = inputs(clients * requests)
    limits = httpx.Limits(max_connections=clients * 4)
    async with httpx.AsyncClient(timeout=900, limits=limits, trust_env=False) as client:

        async def one_client(c: int) -> int:
            done = 0
            for r in range(requests):
                done += await MODES[mode](client, url, texts[c * requests + r])
            return done

        start = time.perf_counter()
        answered = sum(await asyncio.gather(*(one_client(c) for c in range(clients))))
        return answered / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Model directory (default: the benchmark GPT-2-124M shape).")
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--requests", type=int, default=3, help="Requests per client.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decisions.json")
    args = parser.parse_args(argv)
    model = args.model or ensure_model(default_model_dir(0)).path
    AutoTokenizer.from_pretrained(model)  # fail early on a directory without a tokenizer
    port = free_port()
    # Every option is one engine request: 32 clients x 3 questions x 3 options wait at once.
    env = textgen_env(REPO, MODEL_NAME, TEXTGEN_MAX_QUEUE="4096")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-decisions-"))
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--port", str(port)]
    server = Server("textgen", cmd, port, log_dir / "textgen.log", env)
    server.start()
    results: dict[str, Any] = {"model": str(model), "requests_per_client": args.requests, "questions": len(QUESTIONS)}
    try:
        server.wait_healthy(300)
        for clients in [int(c) for c in args.clients.split(",")]:
            row = {}
            for mode in MODES:
                best = max(
                    asyncio.run(measure(server.base_url, mode, clients, args.requests)) for _ in range(args.rounds)
                )
                row[mode] = round(best, 3)
            results[f"{clients}_clients"] = row
            ratio = ", ".join(f"{m} {v} ({row['decisions'] / v:.2f}x)" for m, v in row.items() if m != "decisions")
            print(f"{clients} client(s): decisions {row['decisions']} decisions/s; {ratio}", flush=True)
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
