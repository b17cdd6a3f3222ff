"""Body size, request timeout, CORS, request ids and the access log."""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import Server, start, stop
from tests.e2e.sse import events


@pytest.fixture(scope="module")
def srv(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TEXTGEN_MAX_BODY_BYTES": "20000",
        "TEXTGEN_REQUEST_TIMEOUT": "0.3",
        "TEXTGEN_CORS_ORIGINS": "https://app.example",
        "TEXTGEN_MAX_BATCH_SIZE": "1",
        "TEXTGEN_LOG_PROMPTS": "true",
    }
    server = start(tiny_gpt2_dir, env=env, log_dir=tmp_path_factory.mktemp("logs"))
    yield server
    stop(server.process)


def test_body_too_large(srv: Server) -> None:
    r = httpx.post(f"{srv.url}/generate", json={"inputs": "x" * 30000})
    assert r.status_code == 413
    assert r.json()["error_type"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"inputs": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{srv.url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "x", "prompt": "x" * 30000})
    assert r.status_code == 413 and "message" in r.json()["error"]


def test_timeout_cancels_in_engine(srv: Server) -> None:
    body = {"inputs": "The list", "parameters": {"max_new_tokens": 250, "min_new_tokens": 250}}
    # One slot: long requests hold it, so the next ones wait in the queue past their deadline. Three
    # holders, because the tiny model can now generate 250 tokens in ~0.1 s: with one, a stream
    # queued behind two requests was served whole within its 0.3 s (seen, 2026-12-06).
    with ThreadPoolExecutor(5) as pool:
        start_t = time.monotonic()
        holders = [pool.submit(httpx.post, f"{srv.url}/generate", json=body, timeout=30) for _ in range(3)]
        time.sleep(0.05)
        waiting = pool.submit(httpx.post, f"{srv.url}/generate", json=body, timeout=30)

        def stream_last() -> tuple[dict, float]:
            began = time.monotonic()
            with httpx.stream("POST", f"{srv.url}/generate_stream", json=body, timeout=30) as s:
                return list(events(s))[-1], time.monotonic() - began

        streamed = pool.submit(stream_last)
        r, (last, took) = waiting.result(), streamed.result()
        for holder in holders:
            holder.result()
    if r.status_code == 200 and "error" not in last:
        pytest.skip("the machine generated 4 x 250 tokens within the 0.3 s timeout")
    assert r.status_code == 504 and r.json()["error_type"] == "timeout"
    # A stream served whole must have been within its deadline (measured from the client, which
    # only adds time): one that ran past it and was not cut means the timeout failed.
    assert "error" in last or took < 0.3, (last, took)
    if "error" in last:
        assert last == {"error": last["error"], "error_type": "timeout"}
    assert time.monotonic() - start_t < 5
    # The engine dropped them: a short request is served soon afterwards. A few tries, since on a
    # busy machine even 2 tokens can miss the 0.3 s deadline; had the engine kept the two queued
    # 250-token requests, they would hold the slot for far longer than these tries take.
    codes = []
    for _ in range(5):
        ok = httpx.post(f"{srv.url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
        codes.append(ok.status_code)
        if ok.status_code == 200:
            break
    assert codes[-1] == 200, codes


def test_cors(srv: Server) -> None:
    pre = httpx.options(
        f"{srv.url}/generate",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        f"{srv.url}/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_by_default(server: Server) -> None:
    r = httpx.get(f"{server.url}/info", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_request_id_and_access_log(srv: Server) -> None:
    r = httpx.post(
        f"{srv.url}/generate",
        json={"inputs": "The list", "parameters": {"max_new_tokens": 3}},
        headers={"X-Request-ID": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.post(f"{srv.url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert len(generated.headers["x-request-id"]) >= 16
    time.sleep(0.2)
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line["request_id"] == "abc-123"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["route"] == "/generate" and entry["status"] == 200
    assert entry["prompt_tokens"] >= 1 and entry["generated_tokens"] == 3
    assert entry["finish_reason"] in ("length", "eos_token")
    assert entry["queue_time"] >= 0 and entry["total_time"] > 0
    assert entry["prompt"] == "The list"  # TEXTGEN_LOG_PROMPTS=true here


def test_prompts_not_logged_by_default(server: Server) -> None:
    httpx.post(
        f"{server.url}/generate",
        json={"inputs": "secret prompt text", "parameters": {"max_new_tokens": 2}},
        headers={"X-Request-ID": "no-log-check"},
    )
    time.sleep(0.2)
    log = server.log()
    assert "no-log-check" in log
    assert "secret prompt text" not in log
