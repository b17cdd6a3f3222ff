"""Closed-loop HTTP load: N clients, each sending its next request as soon as the last one ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.stats import RequestRecord


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    max_new_tokens: int
    min_new_tokens: int


Sender = Callable[[httpx.AsyncClient, Job, RequestRecord, float], Awaitable[None]]


def make_client(max_connections: int, request_timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        timeout=httpx.Timeout(connect=10.0, read=request_timeout_s, write=30.0, pool=request_timeout_s),
        trust_env=False,
    )


def ours_stream_sender(base_url: str) -> Sender:
    """`POST /generate_stream` (TGI-style SSE): TTFT is the arrival of the first token event, the
    count comes from the final event's `details.generated_tokens` (else the number of events)."""

    async def send(client: httpx.AsyncClient, job: Job, rec: RequestRecord, t0: float) -> None:
        body = {
            "inputs": job.prompt,
            "parameters": {"max_new_tokens": job.max_new_tokens, "min_new_tokens": job.min_new_tokens},
        }
        events = 0
        async with client.stream("POST", base_url + "/generate_stream", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if not payload:
                    continue
                event = json.loads(payload)
                if event.get("error"):
                    raise RuntimeError(f"stream error: {str(event['error'])[:200]}")
                if event.get("token") is not None:
                    events += 1
                    if rec.first_token is None:
                        rec.first_token = time.perf_counter() - t0
                details = event.get("details")
                if details is not None:
                    rec.generated_tokens = int(details.get("generated_tokens", events))
                    break
            else:
                rec.generated_tokens = events
        rec.done = time.perf_counter() - t0

    return send


def peer_completion_sender(base_url: str, extra_body: dict[str, Any]) -> Sender:
    """`POST /v1/completions` (OpenAI legacy, non-streaming): the count is `usage.completion_tokens`."""

    async def send(client: httpx.AsyncClient, job: Job, rec: RequestRecord, t0: float) -> None:
        body = {"prompt": job.prompt, "max_tokens": job.max_new_tokens, "temperature": 0.0, **extra_body}
        resp = await client.post(base_url + "/v1/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        rec.generated_tokens = int(resp.json()["usage"]["completion_tokens"])
        rec.done = time.perf_counter() - t0

    return send


@dataclass
class LoadResult:
    records: list[RequestRecord]
    wall_s: float
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)


async def closed_loop(
    client: httpx.AsyncClient,
    send: Sender,
    jobs: list[Job],
    concurrency: int,
    phase_timeout_s: float,
    on_done: Callable[[int, int], None] | None = None,
) -> LoadResult:
    """Run `jobs` with `concurrency` clients; each takes the next job when its request ends.
    Stops at `phase_timeout_s`, marking unfinished requests as errors."""
    t0 = time.perf_counter()
    records = [RequestRecord(job.index, job.max_new_tokens, sent=0.0) for job in jobs]
    started = [False] * len(jobs)
    next_job = 0
    done = 0

    async def worker() -> None:
        nonlocal next_job, done
        while next_job < len(jobs):
            i = next_job
            next_job += 1
            rec = records[i]
            started[i] = True
            rec.sent = time.perf_counter() - t0
            try:
                await send(client, jobs[i], rec, t0)
            except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as exc:
                rec.error = f"{type(exc).__name__}: {exc}"[:300]
                rec.done = None
            done += 1
            if on_done is not None:
                on_done(done, len(jobs))

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(jobs)))]
    gathered = asyncio.gather(*tasks)
    # Mark its outcome as seen, so an interrupted run does not log "exception was never retrieved".
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
    timed_out = False
    try:
        await asyncio.wait_for(gathered, timeout=phase_timeout_s)
    except TimeoutError:
        timed_out = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    for i, rec in enumerate(records):
        if rec.done is None and rec.error is None:
            rec.error = "phase timeout" if started[i] else "not sent (phase timeout)"
    return LoadResult(records, wall, timed_out)


class ProgressPrinter:
    """Prints `label: done/total` to stderr at most every `every_s` seconds (and at the end)."""

    def __init__(self, label: str, log: Callable[[str], None], every_s: float = 3.0) -> None:
        self.label = label
        self.log = log
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last >= self.every_s:
            self._last = now
            self.log(f"{self.label}: {done}/{total} requests done")
