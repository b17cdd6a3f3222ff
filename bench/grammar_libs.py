"""Compare grammar engines on a GPT-2 vocabulary: JSON-schema compile time and per-step mask time.

    python -m bench.grammar_libs [tokenizer_dir]

llguidance is a dependency; xgrammar is measured only when importable (install it aside, e.g.
`pip install --target /tmp/xgt xgrammar apache-tvm-ffi` and PYTHONPATH=/tmp/xgt). Each engine
compiles the same ~10-field schema (fresh, no cache) and then walks the same JSON document token by
token, computing the allowed-token mask before every token, as a decode step would.
"""

import json
import statistics
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "nickname": {"type": ["string", "null"]},
        "address": {"type": "object", "properties": {"street": {"type": "string"}}, "required": ["street"]},
    },
    "required": ["name", "age", "email", "active", "score", "tags", "city", "zip", "nickname", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "active": True,
    "score": 9.5,
    "tags": ["math", "engines"],
    "city": "Paris",
    "zip": "75001",
    "nickname": None,
    "address": {"street": "1 Rue de Rivoli"},
}


def _ms(seconds: list[float]) -> str:
    return f"p50 {statistics.median(seconds) * 1e3:.3f} ms, max {max(seconds) * 1e3:.3f} ms"


def bench_llguidance(tokenizer, ids: list[int]) -> None:
    import llguidance
    import llguidance.hf

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    print(f"llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else ''}".strip())
    print(f"  tokenizer setup: {(time.perf_counter() - t0) * 1e3:.1f} ms (once per server)")
    compiles = []
    for _ in range(5):
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        matcher = llguidance.LLMatcher(lltok, grammar)
        matcher.compute_bitmask()  # the first mask builds the lexer: part of the first step's cost
        compiles.append(time.perf_counter() - t0)
    print(f"  compile + first mask: {_ms(compiles)}")
    matcher = llguidance.LLMatcher(lltok, grammar)
    steps = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.compute_bitmask()
        steps.append(time.perf_counter() - t0)
        assert matcher.consume_token(token), matcher.get_error()
    print(f"  mask per step ({len(steps)} steps): {_ms(steps)}")


def bench_xgrammar(tokenizer, ids: list[int]) -> None:
    try:
        import xgrammar
    except ImportError:
        print("xgrammar: not importable, skipped")
        return
    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    print("xgrammar")
    print(f"  tokenizer setup: {(time.perf_counter() - t0) * 1e3:.1f} ms (once per server)")
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    compiles = []
    for _ in range(5):
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        matcher = xgrammar.GrammarMatcher(compiled)
        matcher.fill_next_token_bitmask(bitmask)
        compiles.append(time.perf_counter() - t0)
    print(f"  compile + first mask: {_ms(compiles)}")
    matcher = xgrammar.GrammarMatcher(compiled)
    steps = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        steps.append(time.perf_counter() - t0)
        assert matcher.accept_token(token)
    print(f"  mask per step ({len(steps)} steps): {_ms(steps)}")


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/models/gpt2-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(json.dumps(DOCUMENT))["input_ids"]
    print(f"tokenizer {path} ({len(tokenizer)} tokens); document {len(ids)} tokens; 10-field schema")
    bench_llguidance(tokenizer, ids)
    bench_xgrammar(tokenizer, ids)


if __name__ == "__main__":
    main()
