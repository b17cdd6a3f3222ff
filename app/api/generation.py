"""Shared by every generating route: token limits, submission, and the engine-to-asyncio bridge.

The engine calls back from its own thread; events are handed to the request's event loop.
A request whose client disconnects, or that runs past TEXTGEN_REQUEST_TIMEOUT, is cancelled in
the engine, which drops it at its next step.
"""

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel

from app.api.deps import EngineDep, ServiceDep
from app.api.errors import APIError, from_engine, validation
from app.api.middleware import USAGE_KEY
from app.api.schemas import refused_fields
from app.engine.core.constraints import Grammar
from app.engine.core.types import (
    Completion,
    EngineError,
    Event,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from app.engine.engine import Engine
from app.engine.load.loader import Limits
from app.service import Service


def sse_json(payload: dict) -> str:
    """One server-sent event carrying a JSON object (TGI and OpenAI streams alike)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def tokenize_prompt(service: Service, text: str, truncate: int | None = None) -> list[int]:
    assert service.loaded is not None
    ids = service.loaded.tokenizer(text)["input_ids"]
    if truncate is not None and len(ids) > truncate:
        ids = ids[-truncate:]
    return ids


def resolve_max_new_tokens(
    limits: Limits,
    prompt_len: int,
    requested: int | None,
    default: int,
    field: str = "max_new_tokens",
    prompt_field: str = "inputs",
) -> int:
    """The number of tokens to generate; errors name the route's own fields (`prompt_field`)."""
    if prompt_len == 0:
        raise validation(f"`{prompt_field}` must not be empty (it tokenized to zero tokens)", prompt_field)
    if prompt_len > limits.max_input_tokens:
        raise validation(
            f"`{prompt_field}` must have at most {limits.max_input_tokens} tokens (TEXTGEN_MAX_INPUT_TOKENS). "
            f"Given: {prompt_len}",
            prompt_field,
        )
    room = limits.max_total_tokens - prompt_len
    if requested is None:
        return min(default, room)
    if requested > room:
        raise validation(
            f"`{prompt_field}` tokens + `{field}` must be <= {limits.max_total_tokens} (TEXTGEN_MAX_TOTAL_TOKENS). "
            f"Given: {prompt_len} `{prompt_field}` tokens and {requested} `{field}`",
            field,
        )
    return requested


def check_refused(body: BaseModel, prefix: str = "") -> None:
    """Refuse known fields this server does not implement (see app/api/schemas.Refused)."""
    names = refused_fields(body, prefix)
    if names:
        raise validation(
            f"`{names[0]}` is not supported by this server; omit it or send null"
            + (f" (also refused: {', '.join(names[1:])})" if len(names) > 1 else ""),
            names[0],
        )


def check_stop(service: Service, stop: list[str]) -> tuple[str, ...]:
    limit = service.settings.max_stop_sequences
    if len(stop) > limit:
        raise validation(f"`stop` has {len(stop)} strings; at most {limit} are allowed", "stop")
    return tuple(stop)


@dataclass
class Context:
    """What a generating route hands down: the engine, the service, and the request's usage
    record (read by the access log once the response is complete)."""

    engine: Engine
    service: Service
    usage: dict


def get_context(request: Request, engine: EngineDep, service: ServiceDep) -> Context:
    return Context(engine, service, request.scope.setdefault(USAGE_KEY, {}))


ContextDep = Annotated[Context, Depends(get_context)]


class Generation:
    """One request in the engine, consumed from the event loop. Past TEXTGEN_REQUEST_TIMEOUT it
    is cancelled in the engine and raises a 504 error."""

    def __init__(
        self,
        ctx: Context,
        prompt_ids: list[int],
        sampling: SamplingParams,
        stopping: StoppingParams,
        prefill_details: bool = False,
        grammar: Grammar | None = None,
        adapter: str | None = None,
        prefill_details_from: int = 0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.request = GenerationRequest(
            prompt_ids,
            sampling,
            stopping,
            self._deliver,
            prefill_details,
            grammar,
            adapter=adapter,
            prefill_details_from=prefill_details_from,
        )
        self.usage = ctx.usage
        timeout = ctx.service.settings.request_timeout
        self._timeout = timeout
        self._expired = False
        # One timer for the whole request, not one per token (asyncio.timeout_at per event was a
        # timer scheduled and cancelled on the loop for every token).
        self._timer = None if timeout is None else self._loop.call_later(timeout, self._expire)
        self.done = False
        try:
            ctx.engine.submit(self.request)
        except EngineError as exc:
            self._stop_timer()
            raise from_engine(exc) from exc

    def _deliver(self, event: Event) -> None:
        """The engine's callback, on its thread. uvloop (libuv's uv_async_send) and asyncio alike
        wake the loop once for all callbacks queued before it runs, so a step's events for every
        stream cross in about one wake-up (measured: ~3 loop wake-ups a step at 16 streams)."""
        self._loop.call_soon_threadsafe(self.receive, event)

    def receive(self, event: Event) -> None:
        """On the event loop: queue `event` for `events()`."""
        self._events.append(event)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cancel(self) -> None:
        if not self.done:
            self.request.cancel()

    def _record(self, c: Completion) -> None:
        u = self.usage
        u["prompt_tokens"] = u.get("prompt_tokens", 0) + c.prompt_tokens
        u["generated_tokens"] = u.get("generated_tokens", 0) + c.generated_tokens
        u["queue_time"] = max(u.get("queue_time", 0.0), c.queue_time)
        u.setdefault("finish_reasons", []).append(c.finish_reason)
        u.setdefault("outputs", []).append(c.text)
        u.setdefault("completions", []).append(c)  # read by app.tracing for the request's spans

    async def _next(self) -> Event:
        """The next event; past the deadline with none waiting, cancel and raise a 504 APIError."""
        while not self._events:
            if self._expired:
                self.cancel()
                raise APIError(504, f"request timed out after {self._timeout} s (TEXTGEN_REQUEST_TIMEOUT)", "timeout")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    async def events(self) -> AsyncIterator[Event]:
        try:
            while not self.done:
                event = await self._next()
                if event.completion is not None:
                    self.done = True
                    self._record(event.completion)
                    if event.completion.finish_reason in ("error", "cancelled"):
                        raise APIError(
                            500 if event.completion.finish_reason == "error" else 503,
                            event.completion.error or "generation was cancelled",
                            "generation" if event.completion.finish_reason == "error" else "unavailable",
                        )
                yield event
        finally:
            self._stop_timer()
            self.cancel()

    async def result(self) -> Completion:
        async for event in self.events():
            if event.completion is not None:
                return event.completion
        raise APIError(500, "generation ended without a result", "generation")


async def _watch_disconnect(request: Request, generations: list[Generation]) -> None:
    # After the body is read, ASGI `receive` only returns when the client goes away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for g in generations:
                g.cancel()
            return


async def run_to_completion(request: Request, generations: list[Generation]) -> list[Completion]:
    """Wait for every generation, cancelling all of them if the client leaves."""
    watcher = asyncio.create_task(_watch_disconnect(request, generations))
    try:
        return [await g.result() for g in generations]
    finally:
        watcher.cancel()
        for g in generations:
            g.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
