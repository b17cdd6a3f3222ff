"""Rolling restart through a real HAProxy (deploy/local/): 32 clients of mixed /generate,
/generate_stream and /v1/completions while every replica in turn gets SIGTERM and starts again.
Nothing may fail, and the replicas' OTLP trace files hold every request exactly once.
Loopback only; bounded in count (>= 500 requests) and time (a few minutes at most)."""

import asyncio
import importlib.util
import json
import random
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 32
MIN_REQUESTS = 500
LOAD_DEADLINE_S = 170.0
SPAN_KIND_SERVER = 2  # OTLP JSON encodes the enum as its number

pytestmark = [
    pytest.mark.fleet,
    pytest.mark.skipif(
        shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run does)"
    ),
]


def _load_fleet_module():
    spec = importlib.util.spec_from_file_location("textgen_fleet", ROOT / "deploy" / "local" / "fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Load:
    """CLIENTS concurrent clients, each sending one request after another until told to stop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[str] = []
        self.ok: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(self._client(client, c) for c in range(CLIENTS)))

    async def _client(self, client: httpx.AsyncClient, c: int) -> None:
        rng = random.Random(c)
        n = 0
        while not self.stop.is_set():
            request_id = f"rolling-{c}-{n}"
            kind = (c + n) % 3
            n += 1
            self.sent.append(request_id)
            try:
                error = await self._one(client, kind, request_id, rng.randint(4, 24))
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                self.ok.append(request_id)
            else:
                self.failed.append((request_id, error))

    async def _one(self, client: httpx.AsyncClient, kind: int, request_id: str, tokens: int) -> str | None:
        headers = {"X-Request-ID": request_id}
        params = {"max_new_tokens": tokens, "min_new_tokens": tokens}
        if kind == 0:
            r = await client.post("/generate", json={"inputs": "The list", "parameters": params}, headers=headers)
            if r.status_code != 200 or "generated_text" not in r.json():
                return f"/generate {r.status_code}: {r.text[:200]}"
        elif kind == 1:
            body = {"inputs": "The list", "parameters": {**params, "details": True}}
            final = None
            async with client.stream("POST", "/generate_stream", json=body, headers=headers) as r:
                if r.status_code != 200:
                    return f"/generate_stream {r.status_code}: {(await r.aread())[:200]!r}"
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            return f"/generate_stream error event: {event}"
                        if event.get("generated_text") is not None:
                            final = event
            if final is None or final["details"]["generated_tokens"] != tokens:
                return f"/generate_stream ended without its final event ({final})"
        else:
            body = {"model": "tiny", "prompt": "The list", "max_tokens": tokens, "min_tokens": tokens}
            r = await client.post("/v1/completions", json=body, headers=headers)
            if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != tokens:
                return f"/v1/completions {r.status_code}: {r.text[:200]}"
        if r.headers.get("x-request-id") != request_id:
            return f"X-Request-ID not echoed: {r.headers.get('x-request-id')}"
        return None


def _server_spans(files: list[Path]) -> Counter[str]:
    """textgen.request_id of every server span in the OTLP JSON-lines files."""
    seen: Counter[str] = Counter()
    for path in files:
        for line in path.read_text().splitlines():
            for resource in json.loads(line)["resourceSpans"]:
                for scope in resource["scopeSpans"]:
                    for span in scope["spans"]:
                        if span["kind"] != SPAN_KIND_SERVER:
                            continue
                        attrs = {a["key"]: a["value"] for a in span.get("attributes", [])}
                        if "textgen.request_id" in attrs:
                            seen[attrs["textgen.request_id"]["stringValue"]] += 1
    return seen


def test_rolling_restart_loses_nothing(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    fleet_module = _load_fleet_module()
    fleet = fleet_module.Fleet(
        tmp_path / "fleet",
        replicas=2,
        model=str(tiny_gpt2_dir),
        drain_delay=2.0,
        env={"TEXTGEN_SERVED_MODEL_NAME": "tiny", "TEXTGEN_SHUTDOWN_TIMEOUT": "60"},
    )
    exit_codes: list[int | None] = []
    restart_s: list[tuple[float, float]] = []
    load = Load(fleet.url)
    try:
        fleet.start()
        load.thread.start()
        started = time.monotonic()
        while len(load.sent) < CLIENTS * 2:  # every client busy before the first SIGTERM
            assert time.monotonic() - started < 60, "the load did not start"
            time.sleep(0.05)
        for replica in fleet.replicas:
            code, stop_s, start_s = fleet.restart(replica)
            exit_codes.append(code)
            restart_s.append((round(stop_s, 1), round(start_s, 1)))
        while len(load.sent) < MIN_REQUESTS and time.monotonic() - started < LOAD_DEADLINE_S:
            time.sleep(0.1)
        load.stop.set()
        load.thread.join(90)
        assert not load.thread.is_alive(), "clients still running after the stop"
        elapsed = time.monotonic() - started
        stats = fleet.stats()
    finally:
        load.stop.set()
        fleet.stop()  # also flushes the last spans of every replica
    print(
        f"\nrolling restart: {len(load.sent)} sent, {len(load.ok)} succeeded, {len(load.failed)} failed "
        f"in {elapsed:.0f} s; restarts (s to exit, s to serve again) {restart_s}; per replica "
        f"{ {n: (s['stot'], s['chkdown'], s['wretr'], s['wredis']) for n, s in stats.items()} } "
        "(sessions, times marked down, retries, redispatches)"
    )
    assert load.failed == [], load.failed[:10]
    assert len(load.sent) >= MIN_REQUESTS, f"only {len(load.sent)} requests in {LOAD_DEADLINE_S} s"
    assert exit_codes == [0] * len(fleet.replicas)  # each drained and exited cleanly
    for name, row in stats.items():
        assert int(row["chkdown"]) >= 1, f"HAProxy never took {name} out: the restart went around it"
        assert int(row["stot"]) > 0, f"{name} got no traffic"
    seen = _server_spans(fleet.span_files())
    assert sorted(seen) == sorted(load.sent), "requests missing from, or foreign to, the traces"
    assert [rid for rid, count in seen.items() if count != 1] == []
