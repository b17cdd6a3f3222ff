"""The in-process reference for scoring clients: a /v1/completions that runs `model(ids)` once
per token-id prompt and returns echo logprobs with the top-k at every position, nothing else.
lm-evaluation-harness scores textgen against this (tests/e2e/test_lm_eval.py)."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def score(model: torch.nn.Module, ids: list[int], k: int) -> dict:
    """OpenAI completion logprobs for `ids` echoed plus one greedy token."""
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    nxt = int(logprobs[-1].argmax())
    targets = [*ids[1:], nxt]
    token_logprobs: list[float | None] = [None]
    top_logprobs: list[dict[str, float] | None] = [None]
    for pos, target in enumerate(targets):
        row = logprobs[pos]
        values, top_ids = row.topk(k)
        top = {str(i): v for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)}
        top[str(target)] = float(row[target])
        token_logprobs.append(float(row[target]))
        top_logprobs.append(top)
    return {
        "tokens": [str(i) for i in [*ids, nxt]],
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": list(range(len(ids) + 1)),
    }


@contextmanager
def reference_server(model: torch.nn.Module) -> Iterator[str]:
    """Serve `model` on 127.0.0.1; yield the /v1 base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts = body["prompt"]
            if prompts and isinstance(prompts[0], int):
                prompts = [prompts]
            k = max(1, int(body.get("logprobs") or 1))
            choices = [
                {"index": i, "text": "", "logprobs": score(model, p, k), "finish_reason": "length"}
                for i, p in enumerate(prompts)
            ]
            data = json.dumps({"object": "text_completion", "choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
