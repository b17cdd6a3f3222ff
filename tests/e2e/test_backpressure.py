"""A full queue answers 429 at once while admitted requests complete."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.e2e.server import run_server


def test_queue_full_gives_429_and_admitted_requests_complete(tiny_gpt2_dir: Path) -> None:
    env = {"TEXTGEN_MAX_BATCH_SIZE": "2", "TEXTGEN_MAX_QUEUE": "2"}
    with run_server(tiny_gpt2_dir, env=env) as url:
        body = {"inputs": "The list", "parameters": {"max_new_tokens": 200, "min_new_tokens": 200, "details": True}}

        def one(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=120) as c:
                return c.post("/generate", json=body)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) >= 3  # the queue (2) plus at least the first admitted one
        for r in responses:
            if r.status_code == 200:
                assert r.json()["details"]["generated_tokens"] == 200
            else:
                assert r.json()["error_type"] == "overloaded"
        after = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 3}}, timeout=60)
        assert after.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert f"textgen_rejected_requests_total {float(codes.count(429))}" in metrics.splitlines()
