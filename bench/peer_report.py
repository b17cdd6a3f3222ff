"""The peer table and the issue's peer targets, from bench.peer_rounds' JSON section."""

from __future__ import annotations

from typing import Any

from bench.report import GIB, Ratio, ratio_line

PHASE_NAMES = {"c1": "1 client", "c32": "32 clients", "prefix": "shared prefix", "mixed": "mixed"}


def _best(section: dict[str, Any], key: str, phase: str, metric: str) -> float | None:
    value = (((section.get("contenders") or {}).get(key) or {}).get("best") or {}).get(phase, {}).get(metric)
    return value if isinstance(value, int | float) else None


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _missing(section: dict[str, Any], *keys: str) -> str:
    skipped = section.get("skipped") or {}
    gone = [k for k in keys if k in skipped]
    return f"skipped: {', '.join(gone)}" if gone else ""


def peer_ratios(section: dict[str, Any], transformers_serve_tps: float | None = None) -> list[Ratio]:
    """The peer targets of issues 13 and 21 (ratios of best rounds from this one run)."""

    def b(key: str, phase: str, metric: str) -> float | None:
        return _best(section, key, phase, metric)

    tps, ttft, rss = "tok_per_s", "ttft_p50_s", "peak_rss_bytes"
    cache = ((section.get("contenders") or {}).get("textgen") or {}).get("rounds", {}).get("prefix") or [{}]
    metrics = cache[0].get("prefix_cache_metrics")
    cache_note = "" if isinstance(metrics, dict) else (metrics or "")
    ratios = [
        Ratio(
            "textgen@32 / llama.cpp f32 KV @32 (tok/s)",
            _div(b("textgen", "c32", tps), b("llama_f32", "c32", tps)),
            ">=",
            1.0,
            _missing(section, "llama_f32"),
        ),
        Ratio(
            "textgen@32 / llama.cpp defaults @32 (tok/s)",
            _div(b("textgen", "c32", tps), b("llama_f16", "c32", tps)),
            ">=",
            0.8,
            _missing(section, "llama_f16"),
        ),
        Ratio(
            "textgen bf16 @32 / llama.cpp defaults @32 (tok/s)",
            _div(b("textgen_bf16", "c32", tps), b("llama_f16", "c32", tps)),
            ">=",
            1.2,
            _missing(section, "textgen_bf16", "llama_f16"),
        ),
        Ratio(
            "textgen@1 / llama.cpp f32 KV @1 (tok/s)",
            _div(b("textgen", "c1", tps), b("llama_f32", "c1", tps)),
            ">=",
            0.9,
            _missing(section, "llama_f32") or "moonshot >= 1.0",
        ),
        Ratio(
            "textgen@1 / vLLM CPU fp32 @1 (tok/s)",
            _div(b("textgen", "c1", tps), b("vllm", "c1", tps)),
            ">=",
            1.1,
            _missing(section, "vllm"),
        ),
        Ratio(
            "textgen int8-weight-only @1 / llama.cpp q8_0 @1 (tok/s)",
            _div(b("textgen_int8", "c1", tps), b("llama_q8_0", "c1", tps)),
            ">=",
            0.8,
            _missing(section, "textgen_int8", "llama_q8_0") or "moonshot >= 1.0",
        ),
        Ratio(
            "textgen int4-weight-only @1 / llama.cpp q4_0 @1 (tok/s)",
            _div(b("textgen_int4", "c1", tps), b("llama_q4_0", "c1", tps)),
            ">=",
            0.8,
            _missing(section, "textgen_int4", "llama_q4_0"),
        ),
        Ratio(
            "textgen@32 / vLLM CPU fp32 @32 (tok/s)",
            _div(b("textgen", "c32", tps), b("vllm", "c32", tps)),
            ">=",
            1.1,
            _missing(section, "vllm"),
        ),
        Ratio(
            "textgen int8-weight-only @32 / llama.cpp q8_0 @32 (tok/s)",
            _div(b("textgen_int8", "c32", tps), b("llama_q8_0", "c32", tps)),
            ">=",
            1.2,
            _missing(section, "textgen_int8", "llama_q8_0"),
        ),
        Ratio(
            "TTFT p50 @1 textgen / llama.cpp f32 KV",
            _div(b("textgen", "c1", ttft), b("llama_f32", "c1", ttft)),
            "<=",
            1.2,
            _missing(section, "llama_f32"),
        ),
        Ratio(
            "shared-prefix TTFT p50, prefix cache on / off",
            _div(b("textgen", "prefix", ttft), b("textgen_nocache", "prefix", ttft)),
            "<=",
            0.5,
            cache_note,
        ),
        Ratio(
            "peak RSS @32 textgen / llama.cpp defaults",
            _div(b("textgen", "c32", rss), b("llama_f16", "c32", rss)),
            "<=",
            1.3,
            _missing(section, "llama_f16"),
        ),
        Ratio(
            "textgen@32 / transformers serve @32 (tok/s)",
            _div(b("textgen", "c32", tps), transformers_serve_tps),
            ">=",
            1.15,
            "transformers serve from this run's peer phase, not alternated in rounds"
            if transformers_serve_tps
            else "transformers serve not measured in this run (--peer)",
        ),
        Ratio(
            "textgen@32 / CTranslate2 @32 (tok/s)",
            _div(b("textgen", "c32", tps), b("ct2", "c32", tps)),
            "",
            0.0,
            "static batches",
        ),
        Ratio("textgen@1 / CTranslate2 @1 (tok/s)", _div(b("textgen", "c1", tps), b("ct2", "c1", tps)), "", 0.0),
        Ratio(
            "shared-prefix TTFT p50 textgen / llama.cpp defaults",
            _div(b("textgen", "prefix", ttft), b("llama_f16", "prefix", ttft)),
            "",
            0.0,
        ),
        Ratio(
            "mixed tok/s textgen / llama.cpp defaults",
            _div(b("textgen", "mixed", tps), b("llama_f16", "mixed", tps)),
            "",
            0.0,
        ),
    ]
    return ratios


def _short(error: str) -> str:
    """A failure's head and tail: a server's own message is at the end of its log."""
    return error if len(error) <= 200 else f"{error[:50]} ... {error[-150:]}"


def _fmt(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def render_peers(section: dict[str, Any], ratios: list[Ratio]) -> str:
    """Best round of each contender per phase, then the ratios and the greedy-token check."""
    done = max(
        (
            b.get("rounds", 0)
            for e in (section.get("contenders") or {}).values()
            for b in (e.get("best") or {}).values()
        ),
        default=0,
    )
    lines = [f"peers, best of {done} of {section.get('rounds')} planned alternated rounds (per metric):"]
    header = f"{'contender':<34} {'phase':<13} {'tok/s':>7} {'TTFT p50 ms':>11} {'ITL p50 ms':>10} {'peak RSS GiB':>12} {'err':>3}"
    lines += [header, "-" * len(header)]
    for key, entry in (section.get("contenders") or {}).items():
        for phase, best in (entry.get("best") or {}).items():
            if best.get("error"):
                lines.append(
                    f"{entry.get('label', key)[:34]:<34} {PHASE_NAMES.get(phase, phase):<13} FAILED: {_short(best['error'])}"
                )
                continue
            lines.append(
                f"{entry.get('label', key)[:34]:<34} {PHASE_NAMES.get(phase, phase):<13} "
                f"{_fmt(best.get('tok_per_s'), 1, '.1f'):>7} {_fmt(best.get('ttft_p50_s'), 1e3, '.0f'):>11} "
                f"{_fmt(best.get('itl_p50_s'), 1e3, '.1f'):>10} {_fmt(best.get('peak_rss_bytes'), 1 / GIB, '.2f'):>12} "
                f"{best.get('errors', 0):>3}"
            )
    for key, reason in (section.get("skipped") or {}).items():
        lines.append(f"{key}: skipped ({reason})")
    if section.get("error"):
        lines.append(f"peers: NOT MEASURED: {section['error']}")
    greedy = section.get("greedy") or {}
    for key, g in greedy.items():
        if g.get("matched") is not None:
            lines.append(f"greedy tokens, textgen vs {key}: {g['matched']}/{g['of']} prompts identical")
    lines += ["", "peer ratios (best rounds, this run):"]
    lines += [ratio_line(r) for r in ratios]
    return "\n".join(lines)
