"""Run blocking torch work on a thread that ends with it, not on a pool thread that lives on.

The first parallel torch op on a thread gives it an OpenMP team (libgomp) that lives as long as the
thread. With such a team alive next to the engine thread's, libgomp counts more threads than cores
and stops spinning between parallel regions, so every op of every decode step then waits for its
worker to wake. Measured (torch 2.13, 2 cores, GPT-2-124M, one request): the served decode step went
from 30 to 37-41 ms after the model had been loaded (self-test included) on asyncio's pool thread,
and back to 31 ms with the load on a thread of its own. A thread that ends takes its team with it.
"""

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def on_own_thread(fn: Callable[..., T], *args: object, name: str = "textgen-work") -> T:
    """`fn(*args)` on a new thread named `name`, awaited without blocking the event loop; returns
    its result or raises its exception. The thread has ended when this returns (if cancelled, the
    work runs on to its end and its result is dropped)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # raised in the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        return await done
    finally:
        if done.done():  # not when cancelled: the work may still be running
            thread.join()  # it settled the future as its last act: this returns at once


def _settle(future: "asyncio.Future[T]", result: T | None, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # None only when exc is set
