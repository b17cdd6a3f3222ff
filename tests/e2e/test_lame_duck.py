"""TEXTGEN_DRAIN_DELAY: after SIGTERM /ready is 503 at once, but requests are still admitted for
the delay; then admission stops (503) and everything admitted finishes before a clean exit."""

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.e2e.server import start, stop

DELAY = 2.0
LONG = {"inputs": "The list", "parameters": {"max_new_tokens": 240, "min_new_tokens": 240, "details": True}}
LONG_REQUESTS = 48
SHORT = {"inputs": "The list", "parameters": {"max_new_tokens": 4, "min_new_tokens": 4}}


def test_sigterm_lame_duck_then_drain(tiny_gpt2_dir: Path) -> None:
    # One slot and 48 long requests run one after another (several seconds even on a fast, idle
    # machine: eight finished inside the pause there once, and sixteen after the 2026-12-06 kernels
    # made the tiny model ~3x faster), so work is still in flight when the pause ends and a refused
    # request can be seen.
    env = {"TEXTGEN_DRAIN_DELAY": str(DELAY), "TEXTGEN_SHUTDOWN_TIMEOUT": "150", "TEXTGEN_MAX_BATCH_SIZE": "1"}
    server = start(tiny_gpt2_dir, env=env)
    url = server.url
    results: list[httpx.Response | Exception] = []

    def long_request() -> None:
        try:
            results.append(httpx.post(f"{url}/generate", json=LONG, timeout=180))
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/ready").status_code == 200
            workers = [threading.Thread(target=long_request) for _ in range(LONG_REQUESTS)]
            for w in workers:
                w.start()
            deadline = time.monotonic() + 20
            while not _busy(c):
                assert time.monotonic() < deadline, "the long request never started"
                time.sleep(0.02)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = c.get("/ready")
            health = c.get("/health")
            during_at = time.monotonic() - signalled
            # Admitted, though /ready already says 503; it queues behind the long ones, so it waits
            # in its own thread while the main one checks the end of the pause.
            during_box: list[httpx.Response] = []
            during_thread = threading.Thread(
                target=lambda: during_box.append(httpx.post(f"{url}/generate", json=SHORT, timeout=180))
            )
            during_thread.start()
            while time.monotonic() - signalled < DELAY + 0.5:
                time.sleep(0.05)
            after = c.post("/generate", json=SHORT)
        for w in [*workers, during_thread]:
            w.join(180)
        code = server.process.wait(180)
        exited_after = time.monotonic() - signalled
    finally:
        stop(server.process)
    assert ready.status_code == 503 and ready.json()["detail"] == "draining"
    assert health.status_code == 200
    assert during_at < DELAY, "the request during the pause came too late to prove anything"
    assert len(during_box) == 1 and during_box[0].status_code == 200, during_box
    assert after.status_code == 503 and after.json()["error_type"] == "unavailable"
    assert len(results) == LONG_REQUESTS
    for r in results:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
        assert r.json()["details"]["generated_tokens"] == 240
    assert code == 0
    assert exited_after >= DELAY


def _busy(c: httpx.Client) -> bool:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("textgen_batch_size "):
            return float(line.split()[1]) > 0
    return False
