"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) driven by the official
`anthropic` SDK against a real `textgen serve`: a random tiny GPT-2 behind a chat template that
renders tools, tool calls and tool results, with TEXTGEN_API_KEY set (the SDK sends `x-api-key`)."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import Server, start, stop
from tests.e2e.test_event_loop import BIG, probe_health
from tests.scripted_model import build_scripted

KEY = "sekrit"
MODEL = "tiny"
TEMPLATE = (
    "{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}"
    "{% for c in m.tool_calls or [] %} call {{ c.function.name }} {{ c.function.arguments }}{% endfor %}"
    " {{ m.content or '' }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome", "東京"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
GREEDY = {"temperature": 0}  # the current SDK no longer types `temperature`; older ones sent it


@pytest.fixture(scope="module")
def srv(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("anthropic")
    template = logs / "template.jinja"
    template.write_text(TEMPLATE)
    env = {"TEXTGEN_CHAT_TEMPLATE": str(template), "TEXTGEN_API_KEY": KEY, "TEXTGEN_SERVED_MODEL_NAME": MODEL}
    server = start(tiny_gpt2_dir, env=env, log_dir=logs)
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def client(srv: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)


def rendered_tokens(tiny_gpt2_dir: Path, messages: list[dict], tools: list[dict] | None = None) -> int:
    """The prompt length the chat template gives for the chat-shaped conversation."""
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    text = tok.apply_chat_template(
        messages, tools=tools, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_create_counts_and_stop_sequences(client: anthropic.Anthropic, tiny_gpt2_dir: Path) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}]}
    ]
    out = client.messages.create(
        model=MODEL, max_tokens=8, system="Be brief.", messages=messages, metadata={"user_id": "u1"}, extra_body=GREEDY
    )
    assert out.type == "message" and out.role == "assistant" and out.model == MODEL and out.id.startswith("msg_")
    assert [b.type for b in out.content] == ["text"]
    text = out.content[0].text
    expected = rendered_tokens(
        tiny_gpt2_dir, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    )
    assert out.usage.input_tokens + (out.usage.cache_read_input_tokens or 0) == expected
    assert out.usage.cache_creation_input_tokens == 0
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages)
    assert counted.input_tokens == expected
    if out.stop_reason == "max_tokens":
        assert out.usage.output_tokens == 8
    else:
        assert out.stop_reason == "end_turn"
    # A stop sequence from the middle of that greedy text cuts it there and is reported.
    assert len(text.strip()) >= 4, text
    stop_at = text.strip()[2:4]
    cut = client.messages.create(
        model=MODEL,
        max_tokens=8,
        system="Be brief.",
        messages=messages,
        stop_sequences=["zzqq", stop_at],
        extra_body=GREEDY,
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop_at
    assert cut.content[0].text == text[: text.index(stop_at)]


def test_stream_text_matches_create(client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Once upon"}]
    out = client.messages.create(model=MODEL, max_tokens=6, messages=messages, extra_body=GREEDY)
    kinds = []
    with client.messages.stream(model=MODEL, max_tokens=6, messages=messages, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    with httpx.stream(
        "POST",
        f"{client.base_url}/v1/messages",
        json={"model": MODEL, "max_tokens": 6, "messages": messages, "stream": True, "temperature": 0},
        headers={"x-api-key": KEY},
        timeout=120,
    ) as raw:
        for line in raw.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
    assert streamed == out.content[0].text == final.content[0].text
    assert final.stop_reason == out.stop_reason and final.usage.output_tokens == out.usage.output_tokens
    assert final.usage.input_tokens == out.usage.input_tokens + (out.usage.cache_read_input_tokens or 0) - (
        final.usage.cache_read_input_tokens or 0
    )
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)


def check_weather(block: anthropic.types.ToolUseBlock) -> None:
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    assert block.input["city"] in ("Paris", "Rome", "東京") and 1 <= block.input["days"] <= 7
    assert set(block.input) == {"city", "days"}


def test_tool_use_round_trip(client: anthropic.Anthropic, tiny_gpt2_dir: Path) -> None:
    question = {"role": "user", "content": "Weather in Paris?"}
    out = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[question],
        tools=[WEATHER, TIME],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    )
    assert out.stop_reason == "tool_use", out
    (call,) = out.content
    check_weather(call)
    follow = [
        question,
        {"role": "assistant", "content": out.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]},
    ]
    answer = client.messages.create(
        model=MODEL, max_tokens=5, messages=follow, tools=[WEATHER, TIME], tool_choice={"type": "none"}
    )
    assert answer.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in answer.content)
    # The tool call and its result reached the template as chat's tool_calls and a tool message.
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(call.input, ensure_ascii=False)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    functions = [{"type": "function", "function": {"name": t["name"]}} for t in (WEATHER, TIME)]
    counted = client.messages.count_tokens(model=MODEL, messages=follow, tools=[WEATHER, TIME])
    assert counted.input_tokens == rendered_tokens(tiny_gpt2_dir, chat, functions)
    assert answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0) == counted.input_tokens


@pytest.mark.parametrize(
    "choice", [{"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_weather"}]
)
def test_stream_with_tools(client: anthropic.Anthropic, choice: dict) -> None:
    deltas = []
    with client.messages.stream(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER, TIME] if choice["type"] == "tool" else [WEATHER],
        tool_choice=choice,
        extra_body=GREEDY,
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas.append(event.delta.partial_json)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use", final
    assert final.content and all(b.type == "tool_use" for b in final.content)
    (block,) = final.content
    check_weather(block)
    assert [json.loads(d) for d in deltas] == [b.input for b in final.content]


def test_output_config_json_schema(client: anthropic.Anthropic) -> None:
    schema = WEATHER["input_schema"]
    out = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[{"role": "user", "content": "JSON please"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert out.stop_reason == "end_turn"
    value = json.loads(out.content[0].text)
    assert value["city"] in ("Paris", "Rome", "東京") and set(value) == {"city", "days"}


def error_of(exc: anthropic.APIStatusError) -> dict:
    body = exc.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"container": "c1"}, "container"),
        ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
        ({"temperature": 1.5}, "temperature"),
        ({"speed": "fast"}, "speed"),
        ({"tools": [WEATHER | {"defer_loading": True}]}, "defer_loading"),
        ({"tools": [WEATHER | {"eager_input_streaming": True}]}, "eager_input_streaming"),
        ({"tools": [WEATHER], "output_config": {"format": {"type": "json_schema", "schema": {}}}}, "output_config"),
    ],
)
def test_refused_fields_are_400_in_anthropic_shape(client: anthropic.Anthropic, extra: dict, field: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}], extra_body=extra
        )
    error = error_of(info.value)
    assert error["type"] == "invalid_request_error" and field in error["message"], error


@pytest.mark.parametrize("extra", [{"frequency_penalty": 1}, {"betas": ["x"]}])
def test_unknown_fields_are_400_naming_them(client: anthropic.Anthropic, extra: dict) -> None:
    """As Anthropic answers: "<field>: Extra inputs are not permitted", on both routes."""
    (field,) = extra
    messages = [{"role": "user", "content": "hi"}]
    for call, kwargs in ((client.messages.create, {"max_tokens": 4}), (client.messages.count_tokens, {})):
        with pytest.raises(anthropic.BadRequestError) as info:
            call(model=MODEL, messages=messages, extra_body=extra, **kwargs)  # type: ignore[operator]
        error = error_of(info.value)
        assert error["type"] == "invalid_request_error", error
        assert f"{field}: Extra inputs are not permitted" in error["message"], error


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"thread": {"type": "create"}}, "thread"),
        ({"fallbacks": [{"model": "other"}]}, "fallbacks"),
        ({"compaction": {"type": "enabled"}}, "compaction"),
        ({"billing_policy": {"type": "billing_policy", "bill_to": "user_profile"}}, "billing_policy"),
        ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ],
)
def test_beta_fields_we_lack_are_refused_by_name(client: anthropic.Anthropic, extra: dict, field: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.beta.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}], **extra)
    error = error_of(info.value)
    assert f"`{field}` is not supported" in error["message"], error


def test_every_sdk_field_at_its_neutral_value_is_served(client: anthropic.Anthropic) -> None:
    """What the SDK's create() can send, each set to what asks for nothing we lack: served."""
    messages = [{"role": "user", "content": "hi"}]
    out = client.messages.create(
        model=MODEL,
        max_tokens=4,
        messages=messages,
        system="Be brief.",
        metadata={"user_id": "u1"},
        service_tier="auto",
        thinking={"type": "disabled"},
        speed="standard",
        stop_sequences=["\n\n"],
        cache_control={"type": "ephemeral"},
        container=None,
        inference_geo=None,
        diagnostics=None,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        extra_body=GREEDY,
    )
    assert out.stop_reason in ("end_turn", "max_tokens", "stop_sequence"), out
    beta = client.beta.messages.create(
        model=MODEL, max_tokens=4, messages=messages, mcp_servers=[], context_management=None, extra_body=GREEDY
    )
    assert beta.stop_reason in ("end_turn", "max_tokens"), beta
    counted = client.messages.count_tokens(
        model=MODEL, messages=messages, thinking={"type": "disabled"}, speed="standard", cache_control=None
    )
    assert counted.input_tokens > 0


def test_image_blocks_and_missing_max_tokens_are_400(srv: Server) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    bodies = [
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [image]}]}, "messages.0.content.0"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        (
            {
                "model": MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}],
                "tool_choice": {"type": "any"},
            },
            "tool_choice",
        ),
    ]
    for body, field in bodies:
        r = httpx.post(f"{srv.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert r.json()["type"] == "error" and error["type"] == "invalid_request_error" and field in error["message"]


def test_wrong_key_is_401_and_unknown_model_404(srv: Server, client: anthropic.Anthropic) -> None:
    wrong = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert error_of(auth.value)["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    # x-api-key is an Anthropic-route header only: the OpenAI routes still want a bearer key.
    r = httpx.get(f"{srv.url}/v1/models", headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 401
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    error = error_of(missing.value)
    assert error["type"] == "not_found_error" and "claude-sonnet-4-5" in error["message"]


def test_auto_tool_choice_answers_free_text_streamed_or_not(client: anthropic.Anthropic) -> None:
    """tool_choice auto (the default with tools): the random model writes free text, not a call,
    so it streams as text and ends as it would without tools."""
    body = {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "Hello"}], "tools": [WEATHER]}
    out = client.messages.create(**body, extra_body=GREEDY)
    assert out.stop_reason in ("end_turn", "max_tokens") and [b.type for b in out.content] == ["text"]
    with client.messages.stream(**body, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == out.content[0].text and final.stop_reason == out.stop_reason


def test_without_a_chat_template_messages_is_a_clear_400(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    server = start(tiny_gpt2_dir, log_dir=tmp_path)
    try:
        bare = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        for call in (bare.messages.create, bare.messages.count_tokens):
            kwargs = {"max_tokens": 4} if call == bare.messages.create else {}
            with pytest.raises(anthropic.BadRequestError) as info:
                call(model=model, messages=[{"role": "user", "content": "hi"}], **kwargs)
            assert "TEXTGEN_CHAT_TEMPLATE" in error_of(info.value)["message"]
    finally:
        stop(server.process)


def test_errors_mid_stream_are_error_events(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """A request that runs past TEXTGEN_REQUEST_TIMEOUT: a 504 `timeout_error` when not streamed,
    an `error` event (which the SDK raises) after message_start when streamed."""
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    env = {"TEXTGEN_CHAT_TEMPLATE": str(template), "TEXTGEN_REQUEST_TIMEOUT": "0.001"}
    server = start(tiny_gpt2_dir, env=env, log_dir=tmp_path)
    try:
        slow = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(anthropic.APIStatusError) as plain:
            slow.messages.create(**body)
        assert plain.value.status_code == 504 and error_of(plain.value)["type"] == "timeout_error"
        kinds: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as streamed:  # noqa: PT012 - the error comes while iterating
            with slow.messages.stream(**body) as stream:
                for event in stream:
                    kinds.append(event.type)
        assert kinds[:1] == ["message_start"]  # the stream had begun: the error is an event, not a status
        assert streamed.value.body["error"]["type"] == "timeout_error", streamed.value.body
        assert "timed out" in streamed.value.body["error"]["message"]
    finally:
        stop(server.process)


@pytest.fixture(scope="module")
def caller(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A puppet whose greedy output opens a `<tool_call>` tag: under tool_choice auto the grammar
    then holds it to a complete, valid call (tests/scripted_model.py)."""
    out = tmp_path_factory.mktemp("caller")
    build_scripted(gpt2_tokenizer_dir, out, "<tool_call>", chat_template=TEMPLATE)
    server = start(out, env={"TEXTGEN_SERVED_MODEL_NAME": MODEL}, log_dir=tmp_path_factory.mktemp("caller-logs"))
    yield server
    stop(server.process)


def test_auto_tool_call_round_trip_streamed_and_not(caller: Server) -> None:
    client = anthropic.Anthropic(base_url=caller.url, api_key="unused", max_retries=0, timeout=120)
    question = {"role": "user", "content": "What time is it?"}
    body = {"model": MODEL, "max_tokens": 60, "messages": [question], "tools": [TIME], "extra_body": GREEDY}
    out = client.messages.create(**body)
    assert out.stop_reason == "tool_use", out
    (call,) = out.content
    assert call.type == "tool_use" and call.name == "get_time" and call.input["zone"] in ("UTC", "CET")
    deltas, texts = [], []
    with client.messages.stream(**body) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                (deltas if event.delta.type == "input_json_delta" else texts).append(event.delta)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and not texts  # the tag and JSON never leak as text
    assert [b.input for b in final.content] == [call.input] and len(deltas) == 1
    follow = [
        question,
        {"role": "assistant", "content": out.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "12:00"}]}
            ],
        },
    ]
    answer = client.messages.create(model=MODEL, max_tokens=60, messages=follow, tools=[TIME])
    assert answer.stop_reason == "tool_use"  # the puppet always calls; the conversation rendered


def test_a_2mb_message_is_refused_without_stalling_health(srv: Server, client: anthropic.Anthropic) -> None:
    for call in (client.messages.count_tokens, client.messages.create):
        times: list[float] = []
        stop_probe = threading.Event()
        prober = threading.Thread(target=probe_health, args=(srv.url, stop_probe, times))
        prober.start()
        try:
            time.sleep(0.1)
            kwargs = {"max_tokens": 4} if call == client.messages.create else {}
            with pytest.raises(anthropic.BadRequestError) as info:
                call(model=MODEL, messages=[{"role": "user", "content": BIG}], **kwargs)
        finally:
            stop_probe.set()
            prober.join(30)
        assert "`messages` is " in error_of(info.value)["message"]
        assert len(times) >= 5 and max(times) <= 0.3, f"/health took {max(times):.3f} s"
