"""Targets, ratios and the printed table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3


@dataclass
class Ratio:
    name: str
    value: float | None
    op: str  # ">=" or "<=", or "" for a ratio shown without a target
    target: float
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "SKIP"
        if not self.op:
            return "INFO"
        ok = self.value >= self.target if self.op == ">=" else self.value <= self.target
        return "PASS" if ok else "MISS"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": None if self.value is None else round(self.value, 4),
            "target": f"{self.op} {self.target:g}" if self.op else None,
            "status": self.status,
            "note": self.note,
        }


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def compute_ratios(results: dict[str, Any], rss_allowance_bytes: int) -> list[Ratio]:
    phases = results["phases"]
    ours32 = _get(phases, "ours", "levels", "32")
    ours32_tps = _get(ours32, "tok_per_s")
    note32 = f"{ours32['errors']} failed requests at c=32" if ours32 and ours32.get("errors") else ""
    mixed_ours = _get(phases, "mixed", "ours")
    mixed_static = _get(phases, "mixed", "static")
    ours1 = _get(phases, "ours", "levels", "1")
    rss = _get(phases, "ours", "memory")
    ratios = [
        Ratio(
            "ours@32 / ceiling (static batch 32)",
            _div(ours32_tps, _get(phases, "ceiling", "tok_per_s")),
            ">=",
            0.90,
            note32,
        ),
        Ratio(
            "ours@32 / peer@32 (transformers serve)",
            _div(ours32_tps, _get(phases, "peer", "tok_per_s")),
            ">=",
            1.15,
            note32 or ("" if _get(phases, "peer", "tok_per_s") else "peer not measured"),
        ),
        Ratio(
            "ours@32 / baseline (sequential generate)",
            _div(ours32_tps, _get(phases, "baseline", "tok_per_s")),
            ">=",
            8.0,
            note32,
        ),
        Ratio(
            "mixed throughput ours / static",
            _div(_get(mixed_ours, "tok_per_s"), _get(mixed_static, "tok_per_s")),
            ">=",
            1.5,
        ),
        Ratio(
            "mixed shortest-quarter p50 latency ours / static",
            _div(_get(mixed_ours, "shortest_quarter_p50_s"), _get(mixed_static, "shortest_quarter_p50_s")),
            "<=",
            0.33,
        ),
        Ratio(
            "TTFT p50 @1 / (prefill + 1 step)",
            _div(_get(ours1, "ttft_p50_s"), _get(phases, "ttft_reference", "prefill_plus_one_step_p50_s")),
            "<=",
            1.2,
        ),
    ]
    if rss and rss.get("peak_rss_bytes"):
        bound = rss["model_bytes"] + rss["kv_budget_bytes"] + rss_allowance_bytes
        ratios.append(
            Ratio(
                f"peak RSS @{rss['level']} / (model + KV budget + {rss_allowance_bytes / GIB:.1f} GiB runtime)",
                _div(rss["peak_rss_bytes"], bound),
                "<=",
                1.0,
                f"peak {rss['peak_rss_bytes'] / GIB:.2f} GiB, model {rss['model_bytes'] / GIB:.2f} GiB, "
                f"KV budget {rss['kv_budget_bytes'] / GIB:.2f} GiB ({rss['kv_budget_source']})",
            )
        )
    else:
        ratios.append(Ratio("peak RSS / (model + KV budget + runtime)", None, "<=", 1.0, "not measured"))
    return ratios


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def render(results: dict[str, Any], ratios: list[Ratio]) -> str:
    phases = results["phases"]
    rows: list[dict[str, Any]] = []
    for key in ("baseline", "ceiling", "peer"):
        if phases.get(key) and "tok_per_s" in phases[key]:
            rows.append(phases[key])
    for level in (phases.get("ours") or {}).get("levels", {}).values():
        rows.append(level)
    for key in ("static", "ours"):
        row = (phases.get("mixed") or {}).get(key)
        if row and "tok_per_s" in row:
            rows.append(row)
    header = (
        f"{'phase':<40} {'conc':>4} {'reqs':>4} {'tokens':>6} {'wall s':>7} {'tok/s':>7} "
        f"{'TTFT p50/p99 ms':>16} {'E2E p50/p99 s':>14} {'err':>3}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ttft = f"{_fmt(r.get('ttft_p50_s'), '.0f', 1e3)}/{_fmt(r.get('ttft_p99_s'), '.0f', 1e3)}"
        e2e = f"{_fmt(r.get('e2e_p50_s'), '.2f')}/{_fmt(r.get('e2e_p99_s'), '.2f')}"
        lines.append(
            f"{r['name'][:40]:<40} {r['concurrency']:>4} {r['requests']:>4} {r['generated_tokens']:>6} "
            f"{r['wall_s']:>7.1f} {r['tok_per_s']:>7.1f} {ttft:>16} {e2e:>14} {r['errors']:>3}"
        )
    lines.append("")
    for key, phase in phases.items():
        if not isinstance(phase, dict):
            continue
        if phase.get("error"):
            lines.append(f"{key}: NOT MEASURED: {phase['error'][:300]}")
        if phase.get("skipped"):
            lines.append(f"{key}: skipped ({phase['skipped']})")
        for sub, value in phase.items():
            if isinstance(value, dict) and value.get("error"):
                lines.append(f"{key} {sub}: NOT MEASURED: {value['error'][:300]}")
    mixed = phases.get("mixed") or {}
    for key in ("static", "ours"):
        q = _get(mixed, key, "shortest_quarter_p50_s")
        if q is not None:
            lines.append(f"mixed {key}: shortest-quarter p50 latency {q:.2f} s")
    ref = phases.get("ttft_reference") or {}
    if ref.get("prefill_plus_one_step_p50_s") is not None:
        lines.append(
            f"TTFT reference (in-process, batch 1): prefill {ref['prefill_p50_s'] * 1e3:.1f} ms, "
            f"prefill + 1 step {ref['prefill_plus_one_step_p50_s'] * 1e3:.1f} ms"
        )
    mem = (phases.get("ours") or {}).get("memory")
    if mem:
        lines.append(
            f"ours peak RSS during c={mem['level']}: {mem['peak_rss_bytes'] / GIB:.2f} GiB "
            f"(model {mem['model_bytes'] / GIB:.2f} GiB fp32, "
            f"KV budget {mem['kv_budget_bytes'] / GIB:.2f} GiB, "
            f"KV this workload needs {mem['kv_workload_bytes'] / GIB:.2f} GiB)"
        )
    peer = phases.get("peer") or {}
    if peer.get("eos_handling"):
        lines.append(f"peer EOS handling: {peer['eos_handling']}")
    lines.append("")
    lines.append("ratios (from this run):")
    for r in ratios:
        lines.append(ratio_line(r))
    return "\n".join(lines)


def ratio_line(r: Ratio) -> str:
    value = "n/a" if r.value is None else f"{r.value:.3f}"
    note = f"  [{r.note}]" if r.note else ""
    target = f"target {r.op} {r.target:g}" if r.op else "(no target)"
    return f"  {r.status:<4}  {r.name:<62} {value:>7}  {target}{note}"
