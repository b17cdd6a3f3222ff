"""Percentiles and per-phase summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class RequestRecord:
    """One request as a client saw it. Times are seconds from the start of the phase."""

    index: int
    max_new_tokens: int
    sent: float
    first_token: float | None = None
    done: float | None = None
    generated_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent


@dataclass
class PhaseResult:
    """Throughput over the wall time of a phase, plus latency percentiles when known."""

    name: str
    concurrency: int
    requests: int
    generated_tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "generated_tokens": self.generated_tokens,
            "wall_s": round(self.wall_s, 4),
            "tok_per_s": round(self.tok_per_s, 2),
            "ttft_p50_s": _r(percentile(self.ttft_s, 50)),
            "ttft_p99_s": _r(percentile(self.ttft_s, 99)),
            "e2e_p50_s": _r(percentile(self.e2e_s, 50)),
            "e2e_p99_s": _r(percentile(self.e2e_s, 99)),
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            **self.extra,
        }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def from_records(name: str, concurrency: int, records: list[RequestRecord], wall_s: float) -> PhaseResult:
    ok = [r for r in records if r.error is None]
    return PhaseResult(
        name=name,
        concurrency=concurrency,
        requests=len(records),
        generated_tokens=sum(r.generated_tokens for r in records),
        wall_s=wall_s,
        ttft_s=[t for r in ok if (t := r.ttft) is not None],
        e2e_s=[t for r in ok if (t := r.e2e) is not None],
        errors=[f"#{r.index}: {r.error}" for r in records if r.error is not None],
    )


def shortest_quarter(lengths: Sequence[int]) -> list[int]:
    """Indices of the quarter of requests with the smallest max_new_tokens (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return order[: max(1, len(lengths) // 4)]
