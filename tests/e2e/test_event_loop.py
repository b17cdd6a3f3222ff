"""Tokenizing and templating run in a worker thread: a ~2 MB prompt must not stall /health."""

import threading
import time

import httpx

from tests.e2e.server import Server

BIG = "The list of modules, and the import statement. " * 40_000  # ~1.9 MB, under the body cap


def probe_health(url: str, stop: threading.Event, times: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            times.append(time.perf_counter() - start)
            time.sleep(0.01)


def check_route(server: Server, path: str, body: dict) -> None:
    baseline: list[float] = []
    stop = threading.Event()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(20):
            start = time.perf_counter()
            client.get("/health")
            baseline.append(time.perf_counter() - start)
    times: list[float] = []
    prober = threading.Thread(target=probe_health, args=(server.url, stop, times))
    prober.start()
    try:
        time.sleep(0.1)
        started = time.perf_counter()
        response = httpx.post(f"{server.url}{path}", json=body, timeout=120)
        took = time.perf_counter() - started
    finally:
        stop.set()
        prober.join(30)
    assert response.status_code in (400, 422), response.text  # too many tokens: it was tokenized
    assert took > 0.3, "the prompt tokenized too fast to show a stall"
    assert len(times) >= 5
    assert max(times) < 0.1 + max(baseline), f"/health took {max(times):.3f} s while tokenizing ({path})"


def test_a_2mb_prompt_does_not_stall_health(server: Server) -> None:
    check_route(server, "/generate", {"inputs": BIG, "parameters": {"max_new_tokens": 2}})


def test_a_2mb_completion_prompt_does_not_stall_health(server: Server) -> None:
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    check_route(server, "/v1/completions", {"model": model, "prompt": BIG, "max_tokens": 2})


def test_a_2mb_tokenize_is_refused_without_stalling_health(server: Server) -> None:
    """TGI's and vLLM's /tokenize shapes: the text is over the context, so it is a 422 naming the
    field (with its token count), and /health answers within 300 ms while it is tokenized."""
    for field in ("inputs", "prompt"):
        times: list[float] = []
        stop = threading.Event()
        prober = threading.Thread(target=probe_health, args=(server.url, stop, times))
        prober.start()
        try:
            time.sleep(0.1)
            started = time.perf_counter()
            response = httpx.post(f"{server.url}/tokenize", json={field: BIG}, timeout=120)
            took = time.perf_counter() - started
        finally:
            stop.set()
            prober.join(30)
        # TGI's body (`inputs`) gets TGI's 422 `{"error": str}`; vLLM's (`prompt`) vLLM's 400
        # `{"error": {"message", ...}}` (docs/api.md, "Tokenizer routes").
        body = response.json()
        message = body["error"] if field == "inputs" else body["error"]["message"]
        assert response.status_code == (422 if field == "inputs" else 400), response.text[:300]
        assert f"`{field}` is " in message and "tokens" in message, message[:300]
        assert took > 0.3, "the text tokenized too fast to show a stall"
        assert len(times) >= 5
        assert max(times) <= 0.3, f"/health took {max(times):.3f} s while /tokenize ran ({field})"
