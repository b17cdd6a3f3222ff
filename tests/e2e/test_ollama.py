"""The Ollama API (/api/*) driven by the official `ollama` Python client against a real `textgen
serve`, on a scripted GPT-2 (tests/scripted_model.py) with a chat template that renders tools.

The script is three added (non-special) tokens, so greedy output is exact: a tool call
`<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}` + `}</tool_call>`, then the
JSON answer `{"answer": "Sunny", "city": "Paris"}`, then EOS. After a tool result the template
ends the prompt with `}</tool_call>`, so the second turn of a tool round trip is the JSON answer.
"""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import Server, start, stop
from tests.scripted_model import build_scripted

CALL_HEAD = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}'
CALL_TAIL = "}</tool_call>"
ANSWER = '{"answer": "Sunny", "city": "Paris"}'
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools %}tools={{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if messages[-1].role == 'tool' %}}</tool_call>{% endif %}{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def model_dir(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.add_tokens([CALL_HEAD, CALL_TAIL, ANSWER])  # not special: grammars may produce them
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok_dir = tmp_path_factory.mktemp("tools-tokenizer")
    tok.save_pretrained(tok_dir)
    out = tmp_path_factory.mktemp("scripted-tools")
    build_scripted(tok_dir, out, CALL_HEAD + CALL_TAIL + ANSWER, end_id=tok.eos_token_id, chat_template=TEMPLATE)
    return out


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(model_dir, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> str:
    return str(model_dir)  # the served name: TEXTGEN_MODEL, as GET /v1/models lists it


def test_list_show_ps_version(client: ollama.Client, server: Server, model: str) -> None:
    listed = client.list().models
    assert [m.model for m in listed] == [model]
    details = listed[0].details
    assert details is not None and details.family == "gpt2" and details.quantization_level == "F32"
    assert listed[0].size is not None and listed[0].size > 0

    shown = client.show(model)
    assert shown.template == TEMPLATE
    assert shown.capabilities is not None and "tools" in shown.capabilities and "completion" in shown.capabilities
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "gpt2"
    assert shown.modelinfo["gpt2.context_length"] == 256
    assert client.show(f"{model}:latest").template == TEMPLATE  # Ollama's default tag

    running = client.ps().models
    assert [m.model for m in running] == [model]
    assert running[0].context_length == 256 and running[0].expires_at is not None

    version = httpx.get(f"{server.url}/api/version", timeout=30).json()
    assert version["version"].count(".") == 2


def test_generate(client: ollama.Client, model: str) -> None:
    out = client.generate(model, "What is the weather?", options=GREEDY)
    assert out.response == CALL_HEAD + CALL_TAIL + ANSWER
    assert out.done and out.done_reason == "stop"
    assert out.eval_count == 4 and out.prompt_eval_count and out.prompt_eval_count > 1
    assert out.total_duration and out.prompt_eval_duration and out.eval_duration
    assert out.total_duration >= out.prompt_eval_duration + out.eval_duration
    assert out.load_duration == 0
    # `context` (prompt and answer tokens) continues the conversation: it ends in EOS, so EOS comes again.
    assert out.context and len(out.context) == out.prompt_eval_count + out.eval_count
    again = client.generate(model, "", context=out.context, raw=True, options=GREEDY)
    assert again.done_reason == "stop" and again.prompt_eval_count == len(out.context)


def test_generate_streamed_matches(client: ollama.Client, model: str) -> None:
    parts = list(client.generate(model, "What is the weather?", options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.response or "" for p in parts) == CALL_HEAD + CALL_TAIL + ANSWER
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == 4 and last.eval_duration and last.total_duration


def test_stream_is_the_default(server: Server, model: str) -> None:
    body = {"model": model, "prompt": "Hi", "options": {"temperature": 0, "num_predict": 2}}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) == 3 and lines[-1]["done"] and lines[-1]["done_reason"] == "length"


def test_options_are_served(client: ollama.Client, model: str) -> None:
    one = client.generate(model, "Hi", options={"temperature": 0, "num_predict": 1})
    assert one.response == CALL_HEAD and one.done_reason == "length" and one.eval_count == 1
    cut = client.generate(model, "Hi", options={"temperature": 0, "stop": ["</tool_call>"]})
    assert cut.response == CALL_HEAD + "}" and cut.done_reason == "stop"
    # num_ctx caps prompt + output: room for exactly one token.
    prompt_tokens = one.prompt_eval_count
    assert prompt_tokens is not None
    capped = client.generate(model, "Hi", options={"temperature": 0, "num_ctx": prompt_tokens + 1})
    assert capped.eval_count == 1 and capped.done_reason == "length"
    # Ollama's default sampling (temperature 0.8) with a seed is reproducible.
    seeded = [client.generate(model, "Hi", options={"seed": 7, "num_predict": 3}).response for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_logprobs(client: ollama.Client, model: str) -> None:
    out = client.generate(model, "Hi", options=GREEDY, logprobs=True, top_logprobs=2)
    assert out.logprobs is not None and [lp.token for lp in out.logprobs] == [CALL_HEAD, CALL_TAIL, ANSWER]
    for lp in out.logprobs:
        assert lp.logprob <= 0 and lp.top_logprobs is not None and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token


def test_format_json_and_schema(client: ollama.Client, model: str) -> None:
    # The raw prompt ends with the token after which the script writes its JSON answer.
    prompt = "Answer:" + CALL_TAIL
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "city": {"type": "string"}},
        "required": ["answer", "city"],
    }
    for fmt in ("json", schema):
        out = client.generate(model, prompt, raw=True, format=fmt, options=GREEDY)
        assert json.loads(out.response or "") == {"answer": "Sunny", "city": "Paris"}
    # The constraint is applied: the same model must write one of two strings instead.
    forced = client.generate(model, "Hi", raw=True, format={"enum": ["yes", "no"]}, options=GREEDY)
    assert json.loads(forced.response or "") in ("yes", "no")
    chat = client.chat(model, [{"role": "user", "content": "Hi"}], format={"enum": ["yes", "no"]}, options=GREEDY)
    assert json.loads(chat.message.content or "") in ("yes", "no")


def test_chat_streamed_with_tools_round_trip(client: ollama.Client, model: str) -> None:
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    parts = list(client.chat(model, messages, tools=[WEATHER], options=GREEDY, stream=True))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert all(not p.message.content for p in parts)  # the call's text is never streamed as content
    assert parts[-1].done and parts[-1].done_reason == "stop"

    messages.append({"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]})
    messages.append({"role": "tool", "content": "22 C and sunny", "tool_name": "get_weather"})
    final = list(client.chat(model, messages, tools=[WEATHER], options=GREEDY, stream=True))
    assert "".join(p.message.content or "" for p in final) == ANSWER
    assert not any(p.message.tool_calls for p in final) and final[-1].done_reason == "stop"


def test_chat_with_tools_not_streamed(client: ollama.Client, model: str) -> None:
    out = client.chat(model, [{"role": "user", "content": "Weather?"}], tools=[WEATHER], options=GREEDY)
    assert out.message.role == "assistant" and out.message.content == ""
    assert out.message.tool_calls is not None
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert out.done_reason == "stop" and out.eval_count == 2


def test_chat_tool_call_cut_short_is_text(client: ollama.Client, model: str) -> None:
    """A call cut by num_predict does not parse: it comes back as text with `length`, streamed or not."""
    hi = [{"role": "user", "content": "Weather?"}]
    options = {"temperature": 0, "num_predict": 1}
    whole = client.chat(model, hi, tools=[WEATHER], options=options)
    assert whole.message.content == CALL_HEAD and not whole.message.tool_calls and whole.done_reason == "length"
    parts = list(client.chat(model, hi, tools=[WEATHER], options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == CALL_HEAD
    assert not any(p.message.tool_calls for p in parts) and parts[-1].done_reason == "length"


def test_generate_system_reaches_the_template(client: ollama.Client, model: str) -> None:
    plain = client.generate(model, "Hi", options={"temperature": 0, "num_predict": 1})
    with_system = client.generate(model, "Hi", system="Be brief", options={"temperature": 0, "num_predict": 1})
    assert plain.prompt_eval_count is not None and with_system.prompt_eval_count is not None
    assert with_system.prompt_eval_count > plain.prompt_eval_count
    assert with_system.context is not None and plain.context is not None
    assert with_system.context[-1] == plain.context[-1]  # the same answer token


def test_embed(client: ollama.Client, model: str) -> None:
    out = client.embed(model, ["a list", "a tuple"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) > 0
    for vector in out.embeddings:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    assert out.prompt_eval_count and out.prompt_eval_count >= 2
    single = client.embed(model, "a list")
    assert single.embeddings[0] == pytest.approx(out.embeddings[0], abs=1e-5)


def _refused(call, status: int, *needles: str) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        result = call()
        if not isinstance(result, ollama.GenerateResponse | ollama.ChatResponse):
            list(result)  # a stream: the error comes with its first line
    assert info.value.status_code == status, info.value
    for needle in needles:
        assert needle in info.value.error, info.value.error


def test_bad_input_is_refused_in_ollama_shape(client: ollama.Client, model: str) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    _refused(lambda: client.generate("nope", "Hi"), 404, "model 'nope' not found")
    _refused(lambda: client.chat("nope:latest", hi), 404, "model 'nope:latest' not found")
    _refused(lambda: client.generate(model, "Hi", options={"not_an_option": 1}), 400, "options.not_an_option")
    _refused(lambda: client.generate(model, "Hi", options={"num_gpu": 1}), 400, "options.num_gpu")
    _refused(lambda: client.generate(model, "Hi", options={"mirostat": 2}), 400, "options.mirostat")
    _refused(lambda: client.generate(model, "Hi", options={"temperature": 9}), 400, "options.temperature")
    _refused(lambda: client.generate(model, "Hi", options={"repeat_last_n": 64}), 400, "options.repeat_last_n")
    _refused(lambda: client.generate(model, "Hi", images=[b"\x89PNG"]), 400, "images")
    image_message = [{"role": "user", "content": "Hi", "images": [b"\x89PNG"]}]
    _refused(lambda: client.chat(model, image_message, stream=True), 400, "messages[0].images")
    _refused(lambda: client.chat(model, hi, think=True), 400, "think")
    _refused(lambda: client.generate(model, "Hi", template="{{ .Prompt }}"), 400, "template")
    _refused(lambda: client.generate(model, "Hi", suffix="end"), 400, "suffix")
    _refused(lambda: client.generate(model, "Hi", keep_alive=0), 400, "keep_alive")
    _refused(lambda: client.chat(model, hi, tools=[WEATHER], format="json"), 400, "format")
    _refused(lambda: client.embed(model, "x", dimensions=3), 400, "dimensions")
    _refused(lambda: client.generate(model, "Hi", options={"num_ctx": 2}), 400, "options.num_ctx")


def test_keep_alive_and_load(client: ollama.Client, model: str) -> None:
    loaded = client.generate(model)  # no prompt: Ollama's "load the model"
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    out = client.generate(model, "Hi", keep_alive="5m", options={"temperature": 0, "num_predict": 1})
    assert out.response == CALL_HEAD
    assert client.chat(model, [], keep_alive=-1).done_reason == "load"


KEY = "ollama-test-key"


@pytest.fixture(scope="module")
def lora_server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny GPT-2 (no chat template) with one LoRA adapter, behind an API key."""
    from tests.adapters import build_adapter

    adapter = build_adapter(tiny_gpt2_dir, tmp_path_factory.mktemp("lora") / "a0", ["c_attn"], 4, seed=3)
    env = {"TEXTGEN_LORA_ADAPTERS": f"a0={adapter}", "TEXTGEN_API_KEY": KEY}
    srv = start(tiny_gpt2_dir, env=env, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


def test_adapters_base_models_and_keys(lora_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    anonymous = ollama.Client(host=lora_server.url, timeout=60)
    _refused(anonymous.list, 401)
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)  # the client sends it as a Bearer token
    client = ollama.Client(host=lora_server.url, timeout=60)
    base, adapter = (m.model for m in client.list().models)
    assert adapter == "a0"
    shown = client.show("a0")
    assert shown.details is not None and shown.details.parent_model == base
    assert shown.capabilities == ["completion", "embedding"]  # no chat template: no tools

    # A model without a chat template takes the prompt as is; the adapter's output is /v1's.
    options = {"temperature": 0, "num_predict": 8}
    ours = client.generate("a0:latest", "The list", options=options)
    v1 = httpx.post(
        f"{lora_server.url}/v1/completions",
        json={"model": "a0", "prompt": "The list", "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ).json()
    assert ours.response == v1["choices"][0]["text"]
    assert ours.response != client.generate(base, "The list", options=options).response
    assert ours.context is not None  # not raw: the conversation so far comes back

    _refused(lambda: client.chat(base, [{"role": "user", "content": "Hi"}]), 400, "no chat template")
    _refused(lambda: client.generate(base, "Hi", system="Be brief"), 400, "system")

    long_text = "list " * 2000
    cut = client.embed(base, long_text)  # Ollama's default: cut to the model's limit
    assert len(cut.embeddings) == 1
    _refused(lambda: client.embed(base, long_text, truncate=False), 400, "input")
    legacy = client.embeddings(base, "a list").embedding
    assert len(legacy) == len(cut.embeddings[0])
