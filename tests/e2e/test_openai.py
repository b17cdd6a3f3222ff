"""The OpenAI-compatible routes, driven with the official `openai` SDK."""

import base64
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import run_server

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def url(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    args = ["--served-model-name", "tiny", "--chat-template", str(template)]
    with run_server(tiny_gpt2_dir, args=args) as base:
        yield base


@pytest.fixture()
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tok(tiny_gpt2_dir: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_and_usage(client: openai.OpenAI, tok) -> None:  # noqa: ANN001
    r = client.completions.create(model="tiny", prompt="The list", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and isinstance(c.text, str)
    assert r.usage.prompt_tokens == len(tok("The list")["input_ids"])
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Greedy completions equal TGI /generate's text.
    base = str(client.base_url).removesuffix("/v1/")
    tgi = httpx.post(f"{base}/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 8}}).json()
    assert c.text == tgi["generated_text"]


def test_list_prompts_and_n_with_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt=["The list", "A tuple"], max_tokens=6, n=3, seed=5, temperature=1.0
    )
    assert [c.index for c in r.choices] == list(range(6))
    first = [c.text for c in r.choices[:3]]
    assert len(set(first)) > 1  # distinct choices
    again = client.completions.create(
        model="tiny", prompt=["The list", "A tuple"], max_tokens=6, n=3, seed=5, temperature=1.0
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_stop_as_bare_string(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="The list", max_tokens=16, temperature=0).choices[0].text
    stop = full[4:7]
    r = client.completions.create(model="tiny", prompt="The list", max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_echo_and_logprobs(client: openai.OpenAI, tok) -> None:  # noqa: ANN001
    r = client.completions.create(
        model="tiny", prompt="The list of", max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    assert c.text.startswith("The list of")
    n_prompt = len(tok("The list of")["input_ids"])
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[n_prompt:])
    assert lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens) == c.text


def test_token_id_prompt(client: openai.OpenAI, tok) -> None:  # noqa: ANN001
    ids = tok("The list")["input_ids"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0).choices[0].text
    by_text = client.completions.create(model="tiny", prompt="The list", max_tokens=5, temperature=0).choices[0].text
    assert by_ids == by_text


def test_streaming_completion(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="The list", max_tokens=10, temperature=0).choices[0]
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="The list",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == plain.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == plain.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stream_options_are_checked(client: openai.OpenAI) -> None:
    """As vLLM: `stream_options` needs `stream: true`, and its fields are checked (vLLM's
    `continuous_usage_stats` is served: tests/e2e/test_tool_calls.py)."""
    messages = [{"role": "user", "content": "hi"}]
    for create, kwargs in (
        (client.completions.create, {"prompt": "hi"}),
        (client.chat.completions.create, {"messages": messages}),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            create(model="tiny", max_tokens=2, stream_options={"include_usage": True}, **kwargs)
        assert e.value.body["param"] == "stream_options", e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            create(
                model="tiny",
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": "always"},
                **kwargs,
            )
        assert e.value.body["param"] == "stream_options.continuous_usage_stats", e.value.body
        chunks = list(
            create(
                model="tiny",
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": False},
                **kwargs,
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_penalties_accepted(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny",
        prompt="The list",
        max_tokens=6,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        user="someone",
    )
    assert r.choices[0].text is not None


def test_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_embeddings_float_and_base64(client: openai.OpenAI, tok) -> None:  # noqa: ANN001
    r = client.embeddings.create(model="tiny", input=["a list", "a tuple"], encoding_format="float")
    assert [d.index for d in r.data] == [0, 1]
    v = r.data[0].embedding
    assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)
    assert r.usage.prompt_tokens == len(tok("a list")["input_ids"]) + len(tok("a tuple")["input_ids"])
    raw = httpx.post(
        f"{str(client.base_url).rstrip('/')}/embeddings",
        json={"model": "tiny", "input": "a list", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, v, atol=1e-6)
    # The SDK decodes base64 itself when asked for it.
    sdk = client.embeddings.create(model="tiny", input="a list", encoding_format="base64")
    assert sdk.data[0].embedding is not None


def test_errors_surface_as_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=100000)
    assert "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", temperature=5)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="hi", dimensions=7)
    assert "dimensions" in e.value.message


def test_error_shape(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_fields_are_ignored(url: str) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "some_new_field": {"x": 1}, "logit_bias": None}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_chat_without_template_is_400(server) -> None:  # noqa: ANN001 - the shared server has no template
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
        name = c.models.list().data[0].id
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert "TEXTGEN_CHAT_TEMPLATE" in e.value.message


def test_tokenize_detokenize(url: str, tok) -> None:  # noqa: ANN001
    r = httpx.post(f"{url}/tokenize", json={"inputs": "The list of things"}).json()
    assert [t["id"] for t in r["tokens"]] == tok("The list of things")["input_ids"]
    assert r["count"] == len(r["tokens"])
    assert "".join(t["text"] for t in r["tokens"]) == "The list of things"
    back = httpx.post(f"{url}/detokenize", json={"tokens": [t["id"] for t in r["tokens"]]}).json()
    assert back == {"text": "The list of things", "count": r["count"], "prompt": "The list of things"}
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 422
