"""`python -m bench.run`'s peer rounds end to end on a tiny model: missing peers are skipped with
the reason, and textgen (fp32, and int8-weight-only as a quantized contender) against CTranslate2
runs every phase and compares greedy tokens. Nothing here is timed; the counts are the smallest
that exercise each phase."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench.run import main
from tests.conftest import build_tiny_gpt2


@pytest.fixture(scope="module")
def tiny_long_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 512 positions: the shared-prefix phase sends a 300-token system prompt plus a question.
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-512"), n_positions=512)


def _args(model: Path, out: Path) -> list[str]:
    return [
        "--quick",
        "--skip-inprocess",
        "--skip-ours",
        "--model-dir",
        str(model),
        "--out",
        str(out),
        "--new-tokens",
        "4",
        "--mixed-max",
        "8",
        "--mixed-requests",
        "4",
        "--peer-rounds",
        "1",
    ]


@pytest.mark.slow
def test_missing_peers_are_skipped_not_fatal(
    tiny_long_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert main(_args(tiny_long_gpt2, tmp_path / "r.json")) == 0
    out = capsys.readouterr().out
    assert "llama_f16: skipped (llama-server not built" in out
    assert "vllm: skipped (vLLM's CPU build not installed" in out
    assert "peers: NOT MEASURED: no peer available" in out
    peers = json.loads((tmp_path / "r.json").read_text())["peers"]
    assert set(peers["skipped"]) >= {"llama_f16", "llama_f32", "llama_q8_0", "llama_q4_0", "vllm", "ct2"}


@pytest.mark.slow
@pytest.mark.timeout(900)  # three contenders' start-ups and phases; CTranslate2 crawls on a loaded machine
def test_textgen_against_ctranslate2_one_round(
    tiny_long_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec("ctranslate2") is None:
        pytest.skip("ctranslate2 is not installed (the optional `bench` extra: pip install -e '.[bench]')")
    from bench.peers_build import main as build

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert build(["--model-dir", str(tiny_long_gpt2), "--skip-llama", "--skip-vllm"]) == 0
    capsys.readouterr()
    assert main([*_args(tiny_long_gpt2, tmp_path / "r.json"), "--peers", "textgen,textgen_int8,ct2"]) == 0
    out = capsys.readouterr().out
    peers = json.loads((tmp_path / "r.json").read_text())["peers"]
    for key in ("textgen", "ct2"):
        best = peers["contenders"][key]["best"]
        assert set(best) == {"c1", "c32", "prefix", "mixed"}
        for phase, value in best.items():
            assert value["errors"] == 0, (key, phase, value)
            assert value["tok_per_s"] > 0 and value["ttft_p50_s"] is not None and value["peak_rss_bytes"] > 0
    int8 = peers["contenders"]["textgen_int8"]
    assert int8["env"]["TEXTGEN_QUANTIZE"] == "int8-weight-only" and set(int8["best"]) == {"c1", "c32"}
    for value in int8["best"].values():
        assert value["errors"] == 0 and value["tok_per_s"] > 0
    ratios = {r["name"]: r for r in peers["ratios"]}
    assert ratios["textgen int8-weight-only @1 / llama.cpp q8_0 @1 (tok/s)"]["status"] == "SKIP"
    # Peaked logits (the tiny model's init range): both engines pick the same greedy tokens.
    assert peers["greedy"]["ct2"] == {"matched": 32, "of": 32}
    assert "greedy tokens, textgen vs ct2: 32/32 prompts identical" in out
    assert "textgen@32 / CTranslate2 @32 (tok/s)" in out
