"""The pure parts of the peer benchmark: build commands, llama-server flags and stream parsing,
best-round selection, availability and the ratio table (no timing here)."""

from __future__ import annotations

from pathlib import Path

from bench import llama
from bench.clients import Job
from bench.peer_report import peer_ratios, render_peers
from bench.peer_rounds import (
    CONTENDERS,
    Contender,
    availability,
    best_of,
    ct2_records,
    itl,
    metric_lines,
    round_order,
    summarize,
    token_matches,
)
from bench.peers_build import (
    PeerPaths,
    cache_root,
    cmake_build_cmd,
    cmake_configure_cmd,
    gguf_config,
    model_stamp,
)
from bench.stats import RequestRecord

GIB = 1024**3


def test_cache_root_follows_xdg_and_home() -> None:
    assert cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/textgen/peers")
    assert cache_root({"HOME": "/home/u"}) == Path("/home/u/.cache/textgen/peers")


def test_cmake_commands_are_cpu_release_offline_server_only(tmp_path: Path) -> None:
    configure = cmake_configure_cmd(tmp_path)
    for flag in (
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ):
        assert flag in configure
    assert configure[:5] == ["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build")]
    assert cmake_build_cmd(tmp_path) == ["cmake", "--build", str(tmp_path / "build"), "--target", "llama-server", "-j2"]


def test_peer_paths_layout(tmp_path: Path) -> None:
    paths = PeerPaths(tmp_path, Path("/m/gpt2-bench"))
    assert paths.llama_server == paths.llama_src / "build" / "bin" / "llama-server"
    assert paths.gguf == tmp_path / "models" / "gpt2-bench" / "model-f32.gguf"
    assert paths.ct2 == tmp_path / "models" / "gpt2-bench" / "ct2-f32"


def test_gguf_config_adds_n_ctx_only_when_missing() -> None:
    assert gguf_config({"n_positions": 1024})["n_ctx"] == 1024
    assert gguf_config({"n_positions": 1024, "n_ctx": 512})["n_ctx"] == 512
    assert "n_ctx" not in gguf_config({"max_position_embeddings": 2048})


def test_model_stamp_changes_with_the_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"a")
    before = model_stamp(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"bb")
    assert model_stamp(tmp_path) != before


def test_llama_server_flags() -> None:
    cmd = llama.server_cmd(Path("/b/llama-server"), Path("/m.gguf"), 8123, kv_f32=False)
    joined = " ".join(cmd)
    assert "-np 32 -c 8192 -t 2 -tb 2 -cb" in joined and "--host 127.0.0.1 --port 8123" in joined
    assert "-ctk" not in cmd
    f32 = llama.server_cmd(Path("/b/llama-server"), Path("/m.gguf"), 8123, kv_f32=True, context=16384)
    assert f32[-4:] == ["-ctk", "f32", "-ctv", "f32"] and "16384" in f32


def test_completion_body_is_greedy_fixed_length() -> None:
    body = llama.completion_body([1, 2, 3], 64, stream=True, cache_prompt=False)
    assert body["prompt"] == [1, 2, 3] and body["n_predict"] == 64
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["cache_prompt"] is False
    assert body["stream"] is True


def test_parse_stream_events() -> None:
    assert llama.parse_event(": ping") is None
    assert llama.parse_event("data: [DONE]") is None
    event = llama.parse_event('data: {"content": "x", "tokens": [5], "stop": false}')
    assert event is not None and llama.event_tokens(event) == 1
    assert llama.event_tokens({"content": "", "tokens": []}) == 0
    assert llama.event_tokens({"content": "ab"}) == 1
    final = llama.parse_event('data: {"content": "", "stop": true, "tokens_predicted": 64}')
    assert final is not None and final["tokens_predicted"] == 64


def test_itl_and_summary() -> None:
    recs = [
        RequestRecord(0, 8, sent=0.0, first_token=0.1, done=0.8, generated_tokens=8),
        RequestRecord(1, 4, sent=0.0, first_token=0.2, done=0.5, generated_tokens=4),
        RequestRecord(2, 4, sent=0.0, error="boom"),
    ]
    assert itl(recs[0]) == 0.1
    assert itl(recs[2]) is None
    out = summarize("x", 32, recs, 1.0, 3 * GIB)
    assert out["tok_per_s"] == 12.0 and out["errors"] == 1
    assert out["peak_rss_bytes"] == 3 * GIB
    assert out["itl_p50_s"] == 0.1  # median of 0.1 and 0.1
    assert out["shortest_quarter_p50_s"] == 0.5  # the shortest request that finished


def test_best_of_takes_each_metric_from_its_best_clean_round() -> None:
    rounds = [
        {"tok_per_s": 100.0, "ttft_p50_s": 0.05, "peak_rss_bytes": 10, "errors": 0},
        {"tok_per_s": 120.0, "ttft_p50_s": 0.07, "peak_rss_bytes": 12, "errors": 0},
        {"tok_per_s": 500.0, "ttft_p50_s": 0.01, "peak_rss_bytes": 1, "errors": 3},
    ]
    best = best_of(rounds)
    assert best["tok_per_s"] == 120.0 and best["ttft_p50_s"] == 0.05 and best["peak_rss_bytes"] == 10
    assert best["rounds"] == 2
    assert "error" in best_of([{"error": "crashed"}])


def test_round_order_alternates() -> None:
    a, b, c = CONTENDERS[:3]
    assert round_order([a, b, c], 0) == [a, b, c]
    assert round_order([a, b, c], 1) == [c, b, a]


def test_missing_peers_are_skipped_with_a_reason(tmp_path: Path) -> None:
    paths = PeerPaths(tmp_path, tmp_path / "model")
    reasons = {c.key: availability(c, paths) for c in CONTENDERS}
    assert reasons["llama_f16"] is not None and "make bench-peers" in reasons["llama_f16"]
    assert reasons["ct2"] is not None and "bench-peers" in reasons["ct2"] or "ctranslate2" in str(reasons["ct2"])
    assert availability(Contender("x", "x", "other", ()), paths) is not None


def test_greedy_match_count_and_metrics() -> None:
    assert token_matches([[1, 2], [3, 4], [5]], [[1, 2], [3, 5], [5]]) == 2
    text = '# HELP x\ntextgen_prefix_cache_hits_total 300.0\ntextgen_prefix_cache_queries_total{a="b"} 600\nother 1\n'
    assert metric_lines(text, "textgen_prefix_cache") == {
        "textgen_prefix_cache_hits_total": 300.0,
        "textgen_prefix_cache_queries_total": 600.0,
    }


def test_ct2_rows_become_records() -> None:
    jobs = [Job(0, "a", 4, 4), Job(1, "b", 2, 2)]
    recs = ct2_records(jobs, [[0.0, 0.1, 0.4, 4], [0.0, 0.2, 0.3, 2]])
    assert [r.generated_tokens for r in recs] == [4, 2] and recs[1].ttft == 0.2


def _section() -> dict:
    def best(tps: float, ttft: float, rss: int) -> dict:
        return {"tok_per_s": tps, "ttft_p50_s": ttft, "itl_p50_s": 0.01, "peak_rss_bytes": rss, "errors": 0}

    return {
        "rounds": 2,
        "skipped": {"ct2": "not built"},
        "contenders": {
            "textgen": {
                "label": "textgen",
                "best": {"c1": best(40, 0.08, GIB), "c32": best(300, 0.5, 2 * GIB), "prefix": best(200, 0.2, GIB)},
                "rounds": {"prefix": [{"prefix_cache_metrics": {"h": 1.0}}]},
            },
            "textgen_nocache": {"label": "nc", "best": {"prefix": best(150, 0.5, GIB)}},
            "textgen_bf16": {"label": "bf16", "best": {"c32": best(600, 0.3, GIB)}},
            "llama_f16": {"label": "f16", "best": {"c1": best(110, 0.035, GIB), "c32": best(450, 0.1, GIB)}},
            "llama_f32": {"label": "f32", "best": {"c1": best(100, 0.04, GIB), "c32": best(300, 0.1, GIB)}},
        },
        "greedy": {"llama_f32": {"matched": 32, "of": 32}, "ct2": {"matched": None, "of": None}},
    }


def test_peer_ratio_table() -> None:
    ratios = {r.name: r for r in peer_ratios(_section(), transformers_serve_tps=200.0)}
    assert ratios["textgen@32 / llama.cpp f32 KV @32 (tok/s)"].value == 1.0
    assert ratios["textgen@32 / llama.cpp f32 KV @32 (tok/s)"].status == "PASS"
    assert ratios["textgen@32 / llama.cpp defaults @32 (tok/s)"].status == "MISS"  # 300/450 < 0.8
    assert abs(ratios["textgen bf16 @32 / llama.cpp defaults @32 (tok/s)"].value - 600 / 450) < 1e-9
    assert ratios["textgen@1 / llama.cpp f32 KV @1 (tok/s)"].status == "MISS"
    assert ratios["TTFT p50 @1 textgen / llama.cpp f32 KV"].value == 2.0
    assert ratios["shared-prefix TTFT p50, prefix cache on / off"].status == "PASS"
    assert ratios["peak RSS @32 textgen / llama.cpp defaults"].status == "MISS"
    assert ratios["textgen@32 / transformers serve @32 (tok/s)"].value == 1.5
    assert ratios["textgen@32 / CTranslate2 @32 (tok/s)"].status == "SKIP"
    text = render_peers(_section(), list(ratios.values()))
    assert "greedy tokens, textgen vs llama_f32: 32/32 prompts identical" in text
    assert "ct2: skipped (not built)" in text
    assert text.startswith("peers, best of 0 of 2 planned")  # the fixture's best entries carry no round count
    assert "PASS" in text and "MISS" in text


def test_ct2_spec_per_phase(tmp_path: Path) -> None:
    from bench.peer_rounds import Runner, Workload

    texts = ["a b", "c d"]
    prefix = ["SYS\nq1", "SYS\nq2"]
    tokens = {
        "a b": ["a", "Ġb"],
        "c d": ["c", "Ġd"],
        "system": ["SYS"],
        "q:SYS\nq1": ["Ċ", "q1"],
        "q:SYS\nq2": ["Ċ", "q2"],
    }
    w = Workload(texts, {}, tokens, 4, 2, 2, prefix, [7], {}, [3, 5])
    r = Runner(tmp_path, PeerPaths(tmp_path, tmp_path / "m"), w, print, tmp_path, 1.0, 1.0)
    c1 = r.ct2_spec("c1")
    assert c1["mode"] == "sequential" and c1["prompts"] == [["a", "Ġb"], ["c", "Ġd"]] and c1["new_tokens"] == [4, 4]
    assert c1["static_prompt"] is None and c1["threads"] == 2
    pre = r.ct2_spec("prefix")
    assert pre["mode"] == "batch" and pre["batch"] == 32
    assert pre["static_prompt"] == ["SYS"] and pre["prompts"] == [["Ċ", "q1"], ["Ċ", "q2"]]
    assert r.ct2_spec("mixed")["new_tokens"] == [3, 5]
