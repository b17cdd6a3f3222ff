"""Serving many LoRA adapters over HTTP on a real `textgen serve`: choosing one per request
(OpenAI `model`, TGI `parameters.adapter_id`), runtime load and unload under concurrent load with
no request lost, unload waiting for in-flight requests, refusals and metrics."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tests.adapters import build_adapter
from tests.e2e.server import Server, start, stop

KEY = "lora-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-root")
    for i, (targets, rank) in enumerate([(["c_attn"], 4), (["c_attn", "c_proj"], 8), (["c_fc"], 2)]):
        build_adapter(tiny_gpt2_dir, root / f"a{i}", targets, rank, seed=20 + i)
    build_adapter(tiny_gpt2_dir, root / "big", ["c_attn"], 32, seed=5)
    build_adapter(tiny_gpt2_dir, root / "corrupt", ["c_attn"], 4, seed=7)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    wide = tmp_path_factory.mktemp("wide-base")
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(wide)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(wide)
    build_adapter(wide, root / "other-base", ["c_attn"], 4, seed=6)
    return root


@pytest.fixture(scope="module")
def lora_server(tiny_gpt2_dir: Path, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TEXTGEN_LORA_ADAPTERS": f"a0={root / 'a0'}",
        "TEXTGEN_ALLOW_RUNTIME_LORA": "true",
        "TEXTGEN_LORA_ROOT": str(root),
        "TEXTGEN_MAX_LORAS": "3",
        "TEXTGEN_MAX_LORA_RANK": "16",
        "TEXTGEN_API_KEY": KEY,
    }
    srv = start(tiny_gpt2_dir, env=env, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


@pytest.fixture()
def http(lora_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lora_server.url, timeout=120, headers=AUTH) as c:
        yield c


def complete(http: httpx.Client, model: str, prompt: str = "the list", tokens: int = 12) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == tokens
    return r.json()["choices"][0]["text"]


def stream(http: httpx.Client, model: str, tokens: int, chunks: list[tuple[float, dict]]) -> None:
    """A streamed greedy completion; appends (arrival time, chunk) for every chunk with a choice."""
    body = {"model": model, "prompt": "the list", "max_tokens": tokens, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("choices"):
                    chunks.append((time.monotonic(), chunk))


def base_name(http: httpx.Client) -> str:
    return next(m["id"] for m in http.get("/v1/models").json()["data"] if m["parent"] is None)


def test_models_lists_adapters_and_routes_choose_them(http: httpx.Client) -> None:
    cards = http.get("/v1/models").json()["data"]
    base = base_name(http)
    adapter = next(c for c in cards if c["id"] == "a0")
    assert adapter["parent"] == base and adapter["root"].endswith("a0")
    text = complete(http, "a0")
    assert text != complete(http, base), "the adapter left the output unchanged"
    tgi = http.post("/generate", json={"inputs": "the list", "parameters": {"max_new_tokens": 12, "adapter_id": "a0"}})
    assert tgi.status_code == 200, tgi.text
    assert tgi.json()["generated_text"] == text
    chat = http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = http.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 422 and "`adapter_id`: the model 'nope' does not exist" in r.json()["error"], r.text


def test_load_and_unload_under_load_lose_no_request(http: httpx.Client) -> None:
    base = base_name(http)
    expected = {m: complete(http, m) for m in (base, "a0")}
    failures: list[str] = []
    stop_at = threading.Event()
    counts = [0]

    def client(model: str) -> None:
        with httpx.Client(base_url=http.base_url, timeout=120, headers=AUTH) as c:
            for _ in range(200):  # bounded; stopped by the event much earlier
                if stop_at.is_set():
                    return
                try:
                    text = complete(c, model)
                except AssertionError as exc:
                    failures.append(f"{model}: {exc}")
                    return
                if text != expected[model]:
                    failures.append(f"{model}: output changed under load: {text!r}")
                counts[0] += 1

    threads = [threading.Thread(target=client, args=(m,)) for m in (base, "a0") * 3]
    for t in threads:
        t.start()
    try:
        for _round in range(2):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": "a1"})
            assert r.status_code == 200 and "added successfully" in r.text, r.text
            loaded = complete(http, "a1")
            assert loaded not in expected.values()
            # An a1 request streaming while a1 unloads: the unload returns only once it has finished.
            chunks: list[tuple[float, dict]] = []
            slow = threading.Thread(target=stream, args=(http, "a1", 150, chunks))
            slow.start()
            deadline = time.monotonic() + 60
            while len(chunks) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            issued_with = len(chunks)
            r = http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
            unloaded_at = time.monotonic()
            assert r.status_code == 200, r.text
            slow.join(60)
            assert 5 <= issued_with < 100, f"the a1 request was not streaming when the unload began ({issued_with})"
            finish = chunks[-1][1]["choices"][0]
            assert finish["finish_reason"] == "length", chunks[-1]
            # Arrivals race by a socket write at most: the unload answered after the last token.
            assert unloaded_at >= chunks[-1][0] - 0.25, "the unload returned while a1 still generated"
            after = http.post("/v1/completions", json={"model": "a1", "prompt": "x"})
            assert after.status_code == 404, after.text
    finally:
        stop_at.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    assert counts[0] >= 6
    metrics = http.get("/metrics").text
    assert "textgen_lora_adapters_loaded 1.0" in metrics
    assert 'textgen_lora_requests_total{adapter="a0"}' in metrics
    assert 'adapter="a1"' not in metrics  # its series left with it
    assert "textgen_lora_load_seconds_count 3.0" in metrics  # a0 at startup, a1 twice
    assert "textgen_lora_unload_seconds_count 2.0" in metrics


def test_runtime_refusals(http: httpx.Client, lora_server: Server, root: Path) -> None:
    def load(name: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=headers)

    assert (
        httpx.post(f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a1"}).status_code
        == 401
    )
    for path in ("../a1", "/etc", str(root / ".." / "a1"), "a1/../../x"):
        r = load("x", path)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
        assert "must lie under TEXTGEN_LORA_ROOT" in r.json()["error"]["message"]
    r = load("x", "other-base")
    assert r.status_code == 400 and "does not fit the base model" in r.text and "attn.c_attn" in r.text, r.text
    r = load("x", "big")
    assert r.status_code == 400 and "rank 32, above the ceiling TEXTGEN_MAX_LORA_RANK=16" in r.text, r.text
    r = load("x", "missing")  # vLLM's 404 "No adapter found"
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_path", r.text
    r = load("x", ".")  # there, but not an adapter
    assert r.status_code == 400 and "not a PEFT adapter directory" in r.text, r.text
    r = load("a0", "a1")  # vLLM answers a name loaded twice with 400
    assert r.status_code == 400 and "already loaded" in r.text and r.json()["error"]["param"] == "lora_name", r.text
    r = load(base_name(http), "a1")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    for path in ("a1\u0000b", "x" * 5000):  # were 500s (ValueError: embedded null byte; OSError: name too long)
        r = load("x", path)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    # vLLM's fields that textgen does not implement are refused, not ignored.
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": "a1", "load_inplace": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "load_inplace", r.text
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "a0", "lora_int_id": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_int_id", r.text
    r = load("x", "corrupt")  # was a 500 (SafetensorError)
    assert r.status_code == 400 and "cannot read the weights of adapter 'x'" in r.text, r.text
    for name in ("b1", "b2"):
        assert load(name, "a2").status_code == 200
    r = load("b3", "a2")
    assert r.status_code == 409 and "TEXTGEN_MAX_LORAS" in r.text, r.text
    for name in ("b1", "b2"):
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_runtime_loading_is_off_by_default(client: httpx.Client) -> None:
    for route, body in (
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
        ("/v1/unload_lora_adapter", {"lora_name": "x"}),
    ):
        r = client.post(route, json=body)
        assert r.status_code == 403 and "TEXTGEN_ALLOW_RUNTIME_LORA=true" in r.json()["error"]["message"], r.text


def lora_info(http: httpx.Client) -> dict[str, str]:
    """The labels of the one vllm:lora_requests_info series."""
    from prometheus_client.parser import text_string_to_metric_families

    families = [
        f for f in text_string_to_metric_families(http.get("/metrics").text) if f.name == "vllm:lora_requests_info"
    ]
    assert len(families) == 1 and len(families[0].samples) == 1, families
    return families[0].samples[0].labels


def test_lora_requests_info_names_the_adapters_in_use(http: httpx.Client) -> None:
    """vLLM's running_lora_adapters label (what endpoint pickers read for LoRA affinity) names the
    adapters with running requests; it was always empty."""
    assert lora_info(http) == {"max_lora": "3", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    body = {"model": "a0", "prompt": "the list", "max_tokens": 240, "min_tokens": 240, "stream": True}
    seen: list[dict[str, str]] = []
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # running now
        seen.append(lora_info(http))
        for _ in lines:  # drain: the request finishes
            pass
    assert seen[0]["running_lora_adapters"] == "a0", seen
    deadline = time.monotonic() + 10
    while lora_info(http)["running_lora_adapters"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lora_info(http)["running_lora_adapters"] == ""
