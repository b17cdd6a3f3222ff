"""Automatic prefix caching over HTTP: `usage.prompt_tokens_details.cached_tokens` (completions and
chat, streamed and not, read with the official OpenAI client too), the vLLM and textgen counters on
/metrics, /info, prompt logprobs bypassing the cache, and the same text with the cache off."""

import json
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import run_server

MODEL_NAME = "tiny"
SYSTEM = (
    "You are a helpful assistant. The import statement combines two operations: it searches for the "
    "named module, then it binds the results of that search to a name in the local scope."
)


def counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if "prefix_cache" in s.name and s.name.endswith("_total"):
                assert s.labels in ({}, {"model_name": MODEL_NAME}), s
                out[s.name] = s.value
    return out


def complete(client: httpx.Client, prompt: str, **extra: object) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def streamed_chat_usage(client: httpx.Client, question: str) -> tuple[str, dict]:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text += choice["delta"].get("content", "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert usage is not None
    return text, usage


def test_cached_tokens_and_counters_over_http(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"  # the tiny GPT-2 has no chat template of its own
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    env = {"TEXTGEN_SERVED_MODEL_NAME": MODEL_NAME, "TEXTGEN_CHAT_TEMPLATE": str(template)}
    questions = [" First question: what is a module?", " Second question: what is a scope?"]
    with run_server(tiny_gpt2_dir, env=env) as url, httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/info").json()
        assert info["prefix_caching"] is True and info["prefix_cache_max_tokens"] == 2048
        assert counters(url) == {
            "textgen_prefix_cache_queries_total": 0.0,
            "textgen_prefix_cache_hits_total": 0.0,
            "vllm:prefix_cache_queries_total": 0.0,
            "vllm:prefix_cache_hits_total": 0.0,
        }
        first = complete(client, SYSTEM + questions[0])
        prompt_tokens = first["usage"]["prompt_tokens"]
        assert prompt_tokens > 33, "the system prompt should span two full blocks"
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        again = complete(client, SYSTEM + questions[0])
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 16 * ((prompt_tokens - 1) // 16)
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        other = complete(client, SYSTEM + questions[1])
        shared = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert 16 <= shared < other["usage"]["prompt_tokens"]

        # Prompt logprobs need every prompt token's logits: no cached tokens, and not a query.
        echoed = complete(client, SYSTEM + questions[0], echo=True, logprobs=1)
        assert echoed["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert echoed["choices"][0]["text"] == SYSTEM + questions[0] + first["choices"][0]["text"]

        # Streamed: the final usage chunk (the chat template's tokens differ from the raw prompt's).
        chat_text, chat_usage = streamed_chat_usage(client, questions[0])
        assert chat_usage["prompt_tokens_details"] == {"cached_tokens": 0}
        chat_again, chat_usage_again = streamed_chat_usage(client, questions[1])
        chat_cached = chat_usage_again["prompt_tokens_details"]["cached_tokens"]
        assert chat_cached >= 16

        # The official client reads it.
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        chat = sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": questions[0]}],
            max_tokens=6,
            temperature=0,
        )
        assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
        assert chat.usage.prompt_tokens_details.cached_tokens == 16 * ((chat.usage.prompt_tokens - 1) // 16)
        assert chat.choices[0].message.content == chat_text

        queried = 2 * prompt_tokens + other["usage"]["prompt_tokens"]
        queried += chat_usage["prompt_tokens"] + chat_usage_again["prompt_tokens"] + chat.usage.prompt_tokens
        hits = again["usage"]["prompt_tokens_details"]["cached_tokens"] + shared + chat_cached
        hits += chat.usage.prompt_tokens_details.cached_tokens
        assert counters(url) == {
            "textgen_prefix_cache_queries_total": queried,
            "textgen_prefix_cache_hits_total": hits,
            "vllm:prefix_cache_queries_total": queried,
            "vllm:prefix_cache_hits_total": hits,
        }

    with run_server(tiny_gpt2_dir, env={**env, "TEXTGEN_PREFIX_CACHE": "false"}) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/info").json()["prefix_caching"] is False
            for _ in range(2):
                plain = complete(client, SYSTEM + questions[1])
                assert plain["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
                assert plain["choices"][0]["text"] == other["choices"][0]["text"], "the same text without the cache"
            assert streamed_chat_usage(client, questions[1])[0] == chat_again
        assert counters(url)["vllm:prefix_cache_queries_total"] == 0
