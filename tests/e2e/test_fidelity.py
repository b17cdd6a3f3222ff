"""API fidelity (issue 9), one test per failure class, against real `textgen serve` processes:
stories260k (SentencePiece, byte fallback, BOS), and scripted models whose greedy output holds
CJK, emoji and special tokens (tests/scripted_model.py) over the GPT-2 and stories260k tokenizers."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import Server, start, stop
from tests.e2e.sse import events
from tests.scripted_model import build_scripted

SCRIPT = " 你好 😀<|im_end|> done"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name %} name={{ m.name }}{% endif %}"
    "{% if m.tool_call_id %} id={{ m.tool_call_id }}{% endif %}"
    "{% if m.tool_calls %} calls={{ m.tool_calls | tojson }}{% endif %}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}tools={{ tools | tojson }}\n{% endif %}{% if greeting %}{{ greeting }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def scripted_dir(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scripted-gpt2")
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    build_scripted(
        gpt2_tokenizer_dir, out, SCRIPT, add_special=["<|im_end|>"], end_id=tok.eos_token_id, chat_template=TEMPLATE
    )
    return out


def _serve(model: Path, tmp: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(model, log_dir=tmp.mktemp("logs"))
    yield srv
    stop(srv.process)


@pytest.fixture(scope="module")
def gpt2(scripted_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(scripted_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def stories(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(stories260k_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def lily(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("scripted-llama")
    build_scripted(stories260k_dir, out, "你😀 named Lily", arch="llama", end_id=2)
    yield from _serve(out, tmp_path_factory)


def model_of(srv: Server) -> str:
    return httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]


def complete(srv: Server, **body: object) -> dict:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": model_of(srv), **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def check_tiling(text: str, lp: dict) -> None:
    """The invariants: tokens join to the text and every offset points at its token."""
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert "".join(tokens) == text[offsets[0] :] if offsets else text == ""
    for token, offset in zip(tokens, offsets, strict=True):
        assert text[offset:].startswith(token), (token, offset, text)
    for i, (token, value, top) in enumerate(zip(tokens, lp["token_logprobs"], lp["top_logprobs"], strict=True)):
        if value is None:
            assert i == 0 and top is None  # the prompt's first token: nothing predicted it
            continue
        assert top[token] == value  # the chosen token is in its own top_logprobs
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_class1_echoed_prompt_tokens_tile_the_text(stories: Server, gpt2: Server) -> None:
    body = {"prompt": "Once upon", "max_tokens": 1, "temperature": 0, "logprobs": 0, "echo": True}
    choice = complete(stories, **body)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("Once upon")
    assert lp["tokens"][:3] == ["", "Once", " upon"]  # BOS adds no text; SentencePiece keeps the space
    check_tiling(choice["text"], lp)
    # Prompt positions get top_logprobs too (N distinct candidates plus the chosen token).
    choice = complete(stories, **{**body, "logprobs": 3})["choices"][0]
    check_tiling(choice["text"], choice["logprobs"])
    assert all(len(top) >= 3 for top in choice["logprobs"]["top_logprobs"][1:])

    # GPT-2 splits 你 and 好 into two byte-level tokens each: the second carries the character.
    choice = complete(gpt2, prompt="你", max_tokens=2, temperature=0, logprobs=2, echo=True)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "你好" and lp["tokens"] == ["", "你", "", "好"]
    assert "\ufffd" not in "".join(lp["tokens"])  # a candidate that breaks the character shows U+FFFD
    check_tiling(choice["text"], lp)


def test_class2_top_logprobs_are_distinct_and_keep_the_chosen(stories: Server) -> None:
    choice = complete(stories, prompt="The", max_tokens=1, temperature=0, logprobs=20)["choices"][0]
    top = choice["logprobs"]["top_logprobs"][0]
    assert len(top) >= 20  # 20 distinct candidates (plus the chosen one if it is not among them)
    assert choice["logprobs"]["text_offset"] == [3]
    check_tiling("The" + choice["text"], choice["logprobs"])
    choice = complete(stories, prompt="Once upon a time,", max_tokens=1, temperature=0, logprobs=5)["choices"][0]
    assert choice["logprobs"]["tokens"] == [" there"]
    assert " there" in choice["logprobs"]["top_logprobs"][0]
    # TGI's top_tokens render candidates the same way, and the best candidate is the greedy choice.
    out = httpx.post(
        f"{stories.url}/generate",
        json={"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 2, "details": True, "top_n_tokens": 5}},
    ).json()
    tokens, tops = out["details"]["tokens"], out["details"]["top_tokens"]
    assert [t["text"] for t in tokens] == [" there", " was"]
    assert [top[0]["text"] for top in tops] == [" there", " was"]


def _stream_completion(srv: Server, body: dict) -> tuple[str, dict, list[dict]]:
    with httpx.stream(
        "POST", f"{srv.url}/v1/completions", json={"model": model_of(srv), **body, "stream": True}, timeout=60
    ) as r:
        chunks = list(events(r))
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        choice = c["choices"][0]
        text += choice["text"]
        if choice["logprobs"]:
            assert "".join(choice["logprobs"]["tokens"]) == choice["text"]  # a chunk's text is its tokens
            for key in merged:
                merged[key] += choice["logprobs"][key]
        else:
            assert choice["text"] == ""
    return text, merged, chunks


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("stop", [None, ["好 X"], ["done"]])
def test_class3_stream_carries_the_same_logprobs(gpt2: Server, echo: bool, stop: list[str] | None) -> None:
    body = {"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "logprobs": 1, "echo": echo, "stop": stop}
    whole = complete(gpt2, **body)["choices"][0]
    text, merged, _ = _stream_completion(gpt2, body)
    assert text == whole["text"]
    assert merged == whole["logprobs"]
    check_tiling(whole["text"] if echo else "Hello world" + whole["text"], whole["logprobs"])
    if not echo:
        assert whole["logprobs"]["text_offset"][0] == len("Hello world")


def test_class4_stop_strings_match_special_token_text(gpt2: Server, scripted_dir: Path) -> None:
    body = {"prompt": "Hi", "max_tokens": 20, "temperature": 0, "stop": ["<|im_end|>"]}
    choice = complete(gpt2, **body, logprobs=0)["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == " 你好 😀"
    check_tiling("Hi" + choice["text"], choice["logprobs"])
    chat = httpx.post(
        f"{gpt2.url}/v1/chat/completions",
        json={"model": model_of(gpt2), "messages": [{"role": "user", "content": "Hi"}], **body},
    ).json()
    assert chat["choices"][0]["message"]["content"] == " 你好 😀"
    tgi = httpx.post(
        f"{gpt2.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 20, "stop": ["<|im_end|>"]}}
    ).json()
    assert tgi["generated_text"] == " 你好 😀"
    # vLLM's stop_token_ids and ignore_eos.
    im_end = AutoTokenizer.from_pretrained(scripted_dir).convert_tokens_to_ids("<|im_end|>")
    choice = complete(gpt2, prompt="Hi", max_tokens=20, temperature=0, stop_token_ids=[im_end])["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == " 你好 😀"
    long = complete(gpt2, prompt="Hi", max_tokens=14, temperature=0, ignore_eos=True)
    assert long["usage"]["completion_tokens"] == 14 and long["choices"][0]["finish_reason"] == "length"


def test_class5_tgi_stream_and_final_text_agree(lily: Server) -> None:
    params = {"max_new_tokens": 20, "stop": ["Lily"], "details": True}
    final = httpx.post(f"{lily.url}/generate", json={"inputs": "Once", "parameters": params}).json()
    assert final["generated_text"] == " 你😀 named Lily"  # TGI keeps the stop sequence
    assert "".join(t["text"] for t in final["details"]["tokens"]) == final["generated_text"]
    with httpx.stream("POST", f"{lily.url}/generate_stream", json={"inputs": "Once", "parameters": params}) as r:
        evs = list(events(r))
    assert "".join(e["token"]["text"] for e in evs) == evs[-1]["generated_text"] == final["generated_text"]
    # The OpenAI routes cut before the stop string.
    choice = complete(lily, prompt="Once", max_tokens=20, temperature=0, stop=["Lily"])["choices"][0]
    assert choice["text"] == " 你😀 named "


def test_class6_chat_template_sees_every_field(gpt2: Server, scripted_dir: Path) -> None:
    messages = [
        {"role": "user", "content": "What is the weather?", "name": "alice"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    tok = AutoTokenizer.from_pretrained(scripted_dir)
    text = tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, greeting="Hello there"
    )
    assert "name=alice" in text and "id=c1" in text and "tools=" in text and "Hello there" in text
    expected = len(tok(text, add_special_tokens=False)["input_ids"])
    r = httpx.post(
        f"{gpt2.url}/v1/chat/completions",
        json={
            "model": model_of(gpt2),
            "messages": messages,
            "tools": tools,
            "tool_choice": "none",
            "chat_template_kwargs": {"greeting": "Hello there"},
            "max_tokens": 2,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == expected
    for part in ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, {"text": "no type"}):
        r = httpx.post(
            f"{gpt2.url}/v1/chat/completions",
            json={"model": model_of(gpt2), "messages": [{"role": "user", "content": [part]}]},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.0", r.text


REFUSED = [
    ("/v1/completions", {"suffix": "end"}, "suffix", 400),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", 400),
]


@pytest.mark.parametrize(("path", "extra", "field", "status"), REFUSED)
def test_class7_unimplemented_fields_are_refused(gpt2: Server, path: str, extra: dict, field: str, status: int) -> None:
    if path == "/generate":
        body: dict = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, **extra}}
        nulls: dict = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, **{k: None for k in extra}}}
    else:
        base = {"model": model_of(gpt2), "max_tokens": 2}
        base |= {"prompt": "Hi"} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]}
        body, nulls = {**base, **extra}, {**base, **{k: None for k in extra}}
    r = httpx.post(f"{gpt2.url}{path}", json=body)
    assert r.status_code == status, r.text
    error = r.json()
    message = error["error"]["message"] if status == 400 else error["error"]
    assert field.split(".")[-1] in message
    if status == 400:
        assert error["error"]["param"] == field
    assert httpx.post(f"{gpt2.url}{path}", json=nulls).status_code == 200  # null stays accepted


def test_class7_min_p_logit_bias_best_of_are_implemented(gpt2: Server, scripted_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(scripted_dir)
    forced = tok(" done", add_special_tokens=False)["input_ids"][0]
    choice = complete(gpt2, prompt="Hi", max_tokens=1, temperature=0, logit_bias={str(forced): 100})["choices"][0]
    assert choice["text"] == " done"
    greedy = complete(gpt2, prompt="Hi", max_tokens=4, temperature=0)["choices"][0]["text"]
    sampled = complete(gpt2, prompt="Hi", max_tokens=4, temperature=2.0, min_p=1.0, seed=3)["choices"][0]["text"]
    assert sampled == greedy  # min_p = 1 keeps only the most likely token
    out = complete(gpt2, prompt="Hi", max_tokens=3, temperature=1.0, seed=1, best_of=3, n=1, logprobs=0)
    assert len(out["choices"]) == 1 and out["usage"]["completion_tokens"] == 9
    r = httpx.post(f"{gpt2.url}/v1/completions", json={"model": model_of(gpt2), "prompt": "Hi", "n": 2, "best_of": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_class8_smaller_ones(gpt2: Server) -> None:
    url, model = gpt2.url, model_of(gpt2)
    # OpenAI errors name OpenAI fields.
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x " * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "inputs" not in r.text
    r = httpx.post(
        f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x " * 300}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "inputs" not in r.text
    # Over-long embedding input: OpenAI's 400 naming `input`, no TEI-only advice.
    r = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": "word " * 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input" and "truncate" not in r.text
    # max_tokens: null means omitted (16).
    for body in ({}, {"max_tokens": None}):
        out = complete(gpt2, prompt="Hi", temperature=0, ignore_eos=True, **body)
        assert out["usage"]["completion_tokens"] == 16
    # A JSON body is accepted whatever its Content-Type; anything else is told to send JSON.
    raw = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2})
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert httpx.post(f"{url}/v1/completions", content=raw, headers=form).status_code == 200
    assert httpx.post(f"{url}/v1/completions", content=raw).status_code == 200
    r = httpx.post(f"{url}/generate", content="inputs=hi", headers=form)
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"]
    # Chat logprobs: real UTF-8 bytes (a split character's bytes spread over its tokens), no EOS entry.
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2},
    ).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert chat["finish_reason"] == "stop" and chat["message"]["content"] == " 你好 😀 done"
    assert "".join(e["token"] for e in content) == chat["message"]["content"]
    assert b"".join(bytes(e["bytes"]) for e in content) == chat["message"]["content"].encode()
    assert all(e["bytes"] for e in content)  # a token inside a character still has its bytes
    # /detokenize can keep special tokens.
    out = httpx.post(f"{url}/detokenize", json={"tokens": [40, 50256], "skip_special_tokens": False}).json()
    assert out["text"].endswith("<|endoftext|>")


def test_class3_chat_stream_carries_the_same_logprobs(gpt2: Server) -> None:
    body = {
        "model": model_of(gpt2),
        "messages": [{"role": "user", "content": "Hi"}],
        "logprobs": True,
        "top_logprobs": 2,
        "stop": ["😀<|im"],  # matched against the text with special tokens kept
    }
    whole = httpx.post(f"{gpt2.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", f"{gpt2.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [c["choices"][0] for c in events(r) if c["choices"]]
    text = "".join(c["delta"].get("content", "") for c in chunks)
    content = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    for c in chunks:  # a chunk's content is its logprob entries' tokens
        entries = c["logprobs"]["content"] if c["logprobs"] else []
        assert c["delta"].get("content", "") == "".join(e["token"] for e in entries)
    assert text == whole["message"]["content"] == " 你好 "
    assert content == whole["logprobs"]["content"]
