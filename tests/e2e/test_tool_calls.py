"""Tool calls and structured output made exact, over HTTP with the openai SDK (and instructor),
on a puppet GPT-2 whose greedy output is a script (tests/scripted_model.py), so the shape of
every answer is known: key order, a call cut by `stop` or `max_tokens`, a parallel call that
never closes, CJK inside arguments. Also `n` choices in seed order, `tools` + `response_format`,
and vLLM's `stream_options.continuous_usage_stats`."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import instructor
import openai
import pytest
from pydantic import BaseModel
from transformers import AutoTokenizer

from tests.e2e.server import Server, start, stop
from tests.scripted_model import build_scripted

# A template that reads `tools` (so tool_choice "auto" is allowed) and ends with a token no
# script uses: the puppet starts the first script whose first token the constraint allows.
TEMPLATE = (
    "{% if tools %}tools: {{ tools | length }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}\n{% endfor %}assistant:"
)
# The weather arguments, with CJK, then a key no schema here declares.
ARGS = ['{"city": "', "你好", '"', ', "country": "France"}']
# One call written name first, as models write it.
CALL = ['{"name": "', "get_weather", '", "arguments": {"', 'city": "', "Paris", '"}}']
# A list of calls whose second call never ends (a weak model): "zz" then filler until max_tokens.
CALLS = [
    '[{"name": "',
    "lookup",
    '", "arguments": {"q": "',
    "tea",
    '"}}, {"name": "lookup", "arguments": {"q": "',
    "zz",
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MESSAGES = [{"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def puppet(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("puppet")
    eos = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir).eos_token_id
    build_scripted(gpt2_tokenizer_dir, out, ARGS, end_id=eos, chat_template=TEMPLATE, fallbacks=[CALL, CALLS])
    srv = start(out, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


def sdk(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=120, max_retries=0)


def model_of(srv: Server) -> str:
    return httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]


def chat(srv: Server, **body: object) -> dict:
    """One answer, whole and streamed, as {content, calls: [(name, arguments)], finish}; the two
    must agree."""
    client = sdk(srv)
    args = {"model": model_of(srv), "messages": MESSAGES, "temperature": 0, "max_tokens": 40, **body}
    whole = client.chat.completions.create(**args).choices[0]
    message = whole.message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    answer = {"content": message.content, "calls": calls, "finish": whole.finish_reason}
    content, finish = None, None
    streamed: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    for chunk in client.chat.completions.create(**args, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            content = (content or "") + choice.delta.content
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index not in ids, "a call's id comes once, with its first delta"
                ids[delta.index] = delta.id
                streamed[delta.index] = [delta.function.name, ""]
            streamed[delta.index][1] += delta.function.arguments or ""
        if choice.finish_reason is not None:
            assert finish is None
            finish = choice.finish_reason
    stream = {"content": content, "calls": [tuple(streamed[k]) for k in sorted(streamed)], "finish": finish}
    assert stream == answer, (stream, answer)
    return answer


def test_required_call_is_written_name_first(puppet: Server) -> None:
    """The model writes `name` before `arguments`; the constraint keeps that order, so the call
    comes back whole (main sorted the keys: `arguments` first, the call masked into garbage)."""
    out = chat(puppet, tools=[WEATHER, LOOKUP], tool_choice="required", parallel_tool_calls=False)
    assert out == {"content": None, "calls": [("get_weather", '{"city": "Paris"}')], "finish": "tool_calls"}


def test_json_schema_keeps_property_order(puppet: Server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        "required": ["name", "arguments"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "call", "schema": schema}}
    out = chat(puppet, response_format=fmt)
    assert out == {"content": "".join(CALL), "calls": [], "finish": "stop"}


def test_unspecified_additional_properties_are_closed(puppet: Server) -> None:
    """The model goes on to a key the schema does not declare; unspecified
    additionalProperties is false, so the call closes after `city`, CJK intact."""
    out = chat(puppet, tools=[WEATHER], tool_choice=NAMED)
    assert out == {"content": None, "calls": [("get_weather", '{"city": "你好"}')], "finish": "tool_calls"}
    # JSON mode (any object) stays open: the model's extra key is its own business.
    out = chat(puppet, response_format={"type": "json_object"})
    assert json.loads(out["content"]) == {"city": "你好", "country": "France"} and out["finish"] == "stop"


def test_stop_string_cutting_a_named_call_is_length(puppet: Server) -> None:
    """`"}` cuts the arguments to `{"city": "你好`: not valid JSON, so not "tool_calls"; the
    same in the stream (main said "tool_calls" with the cut JSON)."""
    out = chat(puppet, tools=[WEATHER], tool_choice=NAMED, stop=['"}'])
    assert out == {"content": None, "calls": [("get_weather", '{"city": "你好')], "finish": "length"}


def test_max_tokens_cutting_a_named_call_has_one_shape(puppet: Server) -> None:
    """Cut by max_tokens: the call with the arguments so far and "length", streamed and not
    (main sent text when whole and call deltas when streamed)."""
    out = chat(puppet, tools=[WEATHER], tool_choice=NAMED, max_tokens=2)
    assert out == {"content": None, "calls": [("get_weather", '{"city": "你好')], "finish": "length"}


def test_stop_string_inside_constrained_output_is_length(puppet: Server) -> None:
    """A stop string that cuts a JSON document is "length" (the document is not finished);
    one that fires only once the document is whole stays "stop"."""
    body = {"model": model_of(puppet), "prompt": "x", "temperature": 0, "max_tokens": 20}
    schema = {"structured_outputs": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    client = sdk(puppet)
    cut = client.completions.create(**body, extra_body={**schema, "stop": ['"}']}).choices[0]
    assert (cut.text, cut.finish_reason) == ('{"city": "你好', "length")
    whole = client.completions.create(**body, extra_body=schema).choices[0]
    assert (whole.text, whole.finish_reason) == ('{"city": "你好"}', "stop")
    kept = {**schema, "stop": ['"}'], "include_stop_str_in_output": True}  # the stop string ends a whole one
    kept_out = client.completions.create(**body, extra_body=kept).choices[0]
    assert (kept_out.text, kept_out.finish_reason) == ('{"city": "你好"}', "stop")
    chunks = list(client.completions.create(**body, extra_body={**schema, "stop": ['"}']}, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    # Chat's response_format alike.
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema["structured_outputs"]["json"]}}
    assert chat(puppet, response_format=fmt, stop=['"}'])["finish"] == "length"


def test_parallel_calls_cut_keep_the_complete_calls(puppet: Server) -> None:
    """A weak model never closes the list; the first call is complete, so it comes back as a
    call (with "length": the answer was cut), streamed and not."""
    out = chat(puppet, tools=[WEATHER, LOOKUP], tool_choice="required", max_tokens=16)
    assert out == {"content": None, "calls": [("lookup", '{"q": "tea"}')], "finish": "length"}
    # Nothing complete yet: the text comes back as content.
    out = chat(puppet, tools=[WEATHER, LOOKUP], tool_choice="required", max_tokens=3)
    assert out["calls"] == [] and out["finish"] == "length"
    assert out["content"] == '[{"name": "lookup", "arguments": {"q": "'


def test_continuous_usage_stats_in_every_chunk(puppet: Server) -> None:
    """vLLM's `continuous_usage_stats` (with include_usage): `usage` on every chunk, the
    choice's tokens so far; then the usual final usage chunk (main refused it with a 400)."""
    client = sdk(puppet)
    options = {"include_usage": True, "continuous_usage_stats": True}
    for create, body in [
        (client.completions.create, {"prompt": "x"}),
        (client.chat.completions.create, {"messages": MESSAGES}),
    ]:
        chunks = list(
            create(model=model_of(puppet), max_tokens=5, temperature=0, stream=True, stream_options=options, **body)
        )
        assert len(chunks) >= 3
        assert all(c.usage is not None for c in chunks)
        *steps, final = chunks
        assert final.choices == [] and final.usage.completion_tokens == 5
        counts = [c.usage.completion_tokens for c in steps]
        assert counts == sorted(counts) and counts[-1] == 5
        assert {c.usage.prompt_tokens for c in chunks} == {final.usage.prompt_tokens}
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    # Without include_usage it asks for nothing (as in vLLM): no usage anywhere.
    plain = list(
        client.completions.create(
            model=model_of(puppet),
            prompt="x",
            max_tokens=3,
            stream=True,
            stream_options={"continuous_usage_stats": True},
        )
    )
    assert plain and all(c.usage is None for c in plain)


def test_n_choices_in_seed_order(server: Server) -> None:
    """Without best_of, choice i is the seed + i sample, whole and streamed (main sorted the
    whole answer's choices by cumulative logprob)."""
    client = sdk(server)
    body = {"model": model_of(server), "prompt": "the", "max_tokens": 6, "temperature": 1.5, "seed": 11}
    whole = [c.text for c in client.completions.create(**body, n=5).choices]
    alone = [client.completions.create(**{**body, "seed": 11 + i}).choices[0].text for i in range(5)]
    assert whole == alone and len(set(whole)) > 1
    streamed = [""] * 5
    for chunk in client.completions.create(**body, n=5, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == whole
    ranked = client.completions.create(**body, n=2, best_of=5).choices
    assert {c.text for c in ranked} <= set(whole)


def test_tools_with_response_format_names_the_conflict(server: Server) -> None:
    """Even on a model with no chat template, the 400 is about the conflict (main talked about
    the template)."""
    with pytest.raises(openai.BadRequestError) as info:
        sdk(server).chat.completions.create(
            model=model_of(server),
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "response_format", error
    assert "`tools` and `response_format`" in error["message"] and "no chat template" not in error["message"]


class Weather(BaseModel):
    city: str


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON])
def test_instructor(puppet: Server, mode: instructor.Mode) -> None:
    """instructor in TOOLS mode (a named tool call) and JSON mode (json_object) returns the
    puppet's object as a Weather."""
    client = instructor.from_openai(sdk(puppet), mode=mode)
    weather = client.chat.completions.create(
        model=model_of(puppet),
        messages=MESSAGES,
        response_model=Weather,
        temperature=0,
        max_tokens=40,
        max_retries=0,
    )
    assert isinstance(weather, Weather) and weather.model_dump() == {"city": "你好"}
