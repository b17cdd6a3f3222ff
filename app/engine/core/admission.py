"""Which waiting requests join the running batch: a pure function of (waiting, running, limits).

The scheduler calls `admit` once per step with the queue and the running rows; nothing here
touches a model, so every rule is tested directly (tests/unit/engine/test_admission.py).

The rules, in order:
- Cancelled requests are dropped from the queue first, so they hold no slot.
- FIFO: requests are taken from the head of the queue only; one that does not fit stops
  admission, so a long request is never overtaken forever by short ones.
- The first request is always admitted when nothing is running (a request larger than the
  budget is refused at submission by `fits_alone`, so this never breaks the memory bound).
- Each budget binds: `max_batch_size` rows, `max_prefill_tokens` for the newcomers' padded
  prompts, and `max_batch_tokens` for the KV cache (see `peak_tokens`). The prefill bound counts
  the tokens a prefill runs (`prefill_len`: the prompt less what the prefix cache holds, as vLLM
  counts); memory counts whole prompts, since a prefill's cache holds the cached part too.

KV memory is counted in cached token positions: one position is one token's keys and values in
every layer. The running batch's cache is a left-padded rectangle of rows x longest reservation
(prompt + max_new_tokens), and its buffers are sized to exactly that. While newcomers join, the
engine holds at once: the newcomers' own prefill cache (newcomers x longest prompt) and the batch's
buffers; when those are copied into larger (or compacted) ones, layer by layer, one more layer's
worth. So the bound admission keeps is max(new rectangle, current allocation) x (1 + 1/layers)
+ newcomers x longest prompt <= max_batch_tokens.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from app.engine.core.types import EngineError


class RequestTooLargeError(EngineError):
    """The request could never fit the KV-cache budget, even alone: answer 413."""


class Cancellable(Protocol):
    @property
    def cancelled(self) -> bool: ...


class Candidate(Protocol):
    """What admission reads of a request (a `Sequence` in the engine)."""

    @property
    def prompt_len(self) -> int: ...

    @property
    def prefill_len(self) -> int: ...  # prompt tokens the prefill runs (not in the prefix cache)

    @property
    def reserved_tokens(self) -> int: ...

    @property
    def request(self) -> Cancellable: ...


T = TypeVar("T", bound=Candidate)


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_batch_tokens: int  # KV budget, cached token positions (see the module docstring)
    max_prefill_tokens: int  # newcomers x longest newcomer prefill_len, per step
    layers: int = 1  # decoder layers: the old cache is copied one layer at a time
    column_multiple: int = 1  # the KV cache allocates widths in multiples of this (the KV pool: its page size)


@dataclass
class Admission(Generic[T]):
    admitted: list[T]  # leave the queue and are prefilled this step, in FIFO order
    cancelled: list[T]  # leave the queue as cancelled
    waiting: list[T]  # stay queued, in order


def peak_tokens(
    rows: int,
    longest_reserved: int,
    prefill_rows: int,
    longest_prompt: int,
    allocated: int,
    layers: int,
    column_multiple: int = 1,
) -> int:
    """The most KV positions held at once from admitting `prefill_rows` newcomers until the
    batch's next reservation change: their prefill cache, and the larger of the new rectangle and
    the current allocation plus one layer's copy of it. Widths count as the cache allocates them:
    rounded up to `column_multiple`."""
    reserved, prompt = (-(-width // column_multiple) * column_multiple for width in (longest_reserved, longest_prompt))
    largest = max(rows * reserved, allocated)
    return largest + math.ceil(largest / max(layers, 1)) + prefill_rows * prompt


def default_budget(
    max_batch_size: int, max_total_tokens: int, max_prefill_tokens: int, layers: int, column_multiple: int = 1
) -> int:
    """The KV budget when TEXTGEN_MAX_BATCH_TOKENS is unset: enough that it never binds before
    `max_batch_size` requests of `max_total_tokens` each (so only the batch size limits)."""
    return peak_tokens(max_batch_size, max_total_tokens, 1, max_prefill_tokens, 0, layers, column_multiple)


def model_layers(config: object) -> int:
    """Decoder layers of a transformers config (its text part for multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 1)


def fits_alone(request: Candidate, limits: Limits) -> bool:
    """Whether `request` fits the KV budget on an idle engine (else it can never run)."""
    peak = peak_tokens(1, request.reserved_tokens, 1, request.prompt_len, 0, limits.layers, limits.column_multiple)
    return peak <= limits.max_batch_tokens


def admit(waiting: Sequence[T], running: Sequence[Candidate], limits: Limits, allocated: int = 0) -> Admission[T]:
    """Split `waiting` (oldest first) into admitted, cancelled and still-waiting requests.

    `running` are the rows in the batch (cancelled ones are about to leave and are not counted);
    `allocated` is the KV positions the running batch's cache holds now (0 when idle).
    """
    live = [r for r in running if not r.request.cancelled]
    if not live:
        allocated = 0  # the engine frees the cache of a batch with no live rows before prefilling
    cancelled = [w for w in waiting if w.request.cancelled]
    queue = [w for w in waiting if not w.request.cancelled]
    admitted: list[T] = []
    longest_prompt = longest_prefill = 0
    longest_reserved = max((r.reserved_tokens for r in live), default=0)
    for request in queue:
        rows = len(live) + len(admitted) + 1
        prompt = max(longest_prompt, request.prompt_len)
        prefill = max(longest_prefill, request.prefill_len)
        reserved = max(longest_reserved, request.reserved_tokens)
        first = not live and not admitted
        if rows > limits.max_batch_size:
            break
        if not first and (len(admitted) + 1) * prefill > limits.max_prefill_tokens:
            break
        peak = peak_tokens(rows, reserved, len(admitted) + 1, prompt, allocated, limits.layers, limits.column_multiple)
        if not first and peak > limits.max_batch_tokens:
            break
        admitted.append(request)
        longest_prompt, longest_prefill, longest_reserved = prompt, prefill, reserved
    return Admission(admitted, cancelled, queue[len(admitted) :])
