"""Collects each engine request's final `Completion`, by the index it was submitted with (shared by
the engine tests that submit several requests and compare their outputs)."""

import threading
from collections.abc import Callable

from app.engine.core.types import Completion, Event


class Completions:
    def __init__(self, count: int) -> None:
        self.done: dict[int, Completion] = {}
        self.finished = [threading.Event() for _ in range(count)]

    def on_event(self, i: int) -> Callable[[Event], None]:
        """The `on_event` callback of request `i`: keeps its completion and marks it finished."""

        def handle(event: Event) -> None:
            if event.completion is not None:
                self.done[i] = event.completion
                self.finished[i].set()

        return handle

    def wait(self, i: int, timeout: float = 120) -> None:
        assert self.finished[i].wait(timeout), "the engine did not finish in time"

    def wait_all(self, timeout: float = 120) -> None:
        for i in range(len(self.finished)):
            self.wait(i, timeout)
