"""What clients that do not get a normal answer see and leave in the log: a disconnect is logged
as 499 (as nginx does); requests left over after the drain timeout get 503, like every other
shutdown path."""

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.metrics import arrived
from tests.e2e.server import Server, start, stop


def access_lines(server: Server) -> list[dict]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


def test_a_client_disconnect_is_logged_as_499(server: Server) -> None:
    request_id = f"disconnect-{time.monotonic_ns()}"
    body = b'{"inputs": "The list", "parameters": {"max_new_tokens": 250, "min_new_tokens": 250}}'
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        sock.settimeout(30)
        received = b""
        while b"data:" not in received:  # generating; then hang up mid-stream
            chunk = sock.recv(4096)
            assert chunk, "server closed the stream early"
            received += chunk
    deadline = time.monotonic() + 15
    mine: list[dict] = []
    while not mine and time.monotonic() < deadline:
        mine = [line for line in access_lines(server) if line.get("request_id") == request_id]
        time.sleep(0.05)
    assert mine, "no access line for the disconnected request"
    assert mine[0]["status"] == 499 and mine[0]["route"] == "/generate_stream"


def test_leftovers_after_the_drain_timeout_get_503(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    server = start(
        tiny_gpt2_dir,
        env={"TEXTGEN_SHUTDOWN_TIMEOUT": "0.3", "TEXTGEN_MAX_BATCH_SIZE": "1"},
        log_dir=tmp_path,
    )
    results: list[httpx.Response | Exception] = []
    long = {"inputs": "The list", "parameters": {"max_new_tokens": 250, "min_new_tokens": 250}}

    def one() -> None:
        try:
            results.append(httpx.post(f"{server.url}/generate", json=long, timeout=60))
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    try:
        # One slot and 16 x 250 tokens: far more work than the 0.3 s the drain may take, even at the
        # tiny model's ~0.3 ms a token since the 2026-12-06 kernels.
        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while arrived(server.url) < 16:
            assert time.monotonic() < deadline, "the requests did not all reach the engine"
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = server.process.wait(60)
    finally:
        stop(server.process)
    assert len(results) == 16
    assert all(isinstance(r, httpx.Response) for r in results), results
    responses = [r for r in results if isinstance(r, httpx.Response)]
    assert {r.status_code for r in responses} <= {200, 503}, [r.text for r in responses]
    leftovers = [r for r in responses if r.status_code == 503]
    assert len(leftovers) >= 8, [r.status_code for r in responses]
    for r in leftovers:
        assert r.json()["error_type"] == "unavailable"
        assert "TEXTGEN_SHUTDOWN_TIMEOUT" in r.json()["error"], r.text
    assert code == 0
