"""POST /v1/responses against a real server, driven by the openai SDK (`responses.create`,
`responses.stream`) and the openai-agents SDK, on a puppet model whose greedy output we choose.

The puppet is a bigram machine over the GPT-2 tokenizer: its next token depends only on the last
one. Its chat template renders `tools` and ends the prompt with a marker for the turn:
`<c>` when tools are offered and no tool has answered yet (the model then starts `<`, a tool
call in 'auto' mode, which the grammar completes), `<m1>` once a tool has answered (the model then
says " Sunny at noon."), nothing otherwise (" Once upon a time."). Inside a constrained call the
grammar forces the text and the model's ties pick the lowest token id, so calls are deterministic.
"""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from tests.e2e.server import Server, start, stop

TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif -%}"
    "{%- for m in messages -%}"
    "{{ m.role }}: {{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %} [call {{ c.function.name }} {{ c.function.arguments }}]{% endfor %}\n"
    "{%- if m.role == 'tool' %}{% set ns.n = ns.n + 1 %}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant:{% if ns.n %}<m1>{% elif tools %}<c>{% endif %}{% endif -%}"
)
MARKERS = ["<c>", "<m1>"]
# token -> next token (None: EOS); any other token -> " Once".
TABLE: dict[str, str | None] = {
    "<c>": "<",
    "<m1>": " Sunny",
    " Sunny": " at",
    " at": " noon",
    " noon": ".",
    " Once": " upon",
    " upon": " a",
    " a": " time",
    " time": ".",
    ".": None,
}
DEFAULT = " Once"
STORY, ANSWER = " Once upon a time.", " Sunny at noon."

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
SCHEMAS = {t["name"]: t["parameters"] for t in (WEATHER, TIME)}
FORMAT = {
    "type": "json_schema",
    "name": "forecast",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}


class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    days: int = Field(ge=0, le=9)


def build_puppet(tokenizer_dir: Path, out: Path) -> Path:
    """A 1-layer GPT-2 whose attention and MLP write nothing, so the residual stream is the token
    embedding: one dimension per TABLE state (dimension 0 for every other token), and the LM head
    maps each state to its next token."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = TEMPLATE

    def one(text: str | None) -> int:
        if text is None:
            return tok.eos_token_id
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (text, ids)
        return ids[0]

    pairs = [(one(a), one(b)) for a, b in TABLE.items()]
    dim = 2 * (len(pairs) // 2 + 1)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=dim, n_layer=1, n_head=1, tie_word_embeddings=False
    )
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    model = GPT2LMHeadModel(config)
    block = model.transformer.h[0]
    with torch.no_grad():
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        embed, head = model.transformer.wte.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        head[one(DEFAULT), 0] = 10.0
        for i, (state, nxt) in enumerate(pairs):
            embed[state].zero_()
            embed[state, i + 1] = 1.0
            head[nxt, i + 1] = 10.0
    model.generation_config = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def srv(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = build_puppet(gpt2_tokenizer_dir, tmp_path_factory.mktemp("responses-puppet"))
    server = start(model, log_dir=tmp_path_factory.mktemp("responses-logs"))
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def check_call(item: object) -> dict:
    assert item.type == "function_call" and item.call_id.startswith("call_") and item.id.startswith("fc_")
    arguments = json.loads(item.arguments)
    jsonschema.validate(arguments, SCHEMAS[item.name])
    return arguments


def test_text_response_and_usage(client: openai.OpenAI, model: str) -> None:
    out = client.responses.create(model=model, input="Tell me a story", temperature=0)
    assert out.object == "response" and out.id.startswith("resp_") and out.status == "completed"
    assert out.incomplete_details is None and out.error is None
    (message,) = out.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].text == STORY
    assert out.output_text == STORY
    usage = out.usage
    assert usage.output_tokens == 6  # " Once", " upon", " a", " time", ".", EOS (as chat counts it)
    assert usage.input_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert 0 <= usage.input_tokens_details.cached_tokens < usage.input_tokens

    # instructions and developer/system/assistant messages all reach the template
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"role": "user", "content": "A story?"},
    ]
    longer = client.responses.create(model=model, input=messages, instructions="You tell stories.", temperature=0)
    assert longer.output_text == STORY and longer.instructions == "You tell stories."
    assert longer.usage.input_tokens > usage.input_tokens


def test_max_output_tokens_is_incomplete(client: openai.OpenAI, model: str) -> None:
    out = client.responses.create(model=model, input="Tell me a story", max_output_tokens=2, temperature=0)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output[0].status == "incomplete" and out.output_text == " Once upon"
    assert out.usage.output_tokens == 2 and out.max_output_tokens == 2


def test_logprobs_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    request = {"model": model, "input": "Tell me a story", "temperature": 0, "top_logprobs": 2}
    out = client.responses.create(**request, include=["message.output_text.logprobs"])
    part = out.output[0].content[0]
    assert [lp.token for lp in part.logprobs] == [" Once", " upon", " a", " time", "."]  # EOS has no text
    for lp in part.logprobs:
        assert lp.logprob <= 0 and bytes(lp.bytes).decode() == lp.token and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token  # greedy: the chosen token is the most likely
    assert out.top_logprobs == 2
    with client.responses.stream(**request) as stream:  # top_logprobs alone asks for them too
        events = list(stream)
    streamed = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == [lp.token for lp in part.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [lp.logprob for lp in done.logprobs] == [lp.logprob for lp in part.logprobs]
    plain = client.responses.create(model=model, input="Tell me a story")
    assert plain.output[0].content[0].logprobs == []


def test_json_schema_text_format(client: openai.OpenAI, model: str) -> None:
    out = client.responses.create(model=model, input="Forecast?", text={"format": FORMAT}, temperature=0)
    assert out.status == "completed" and out.text.format.type == "json_schema"
    jsonschema.validate(json.loads(out.output_text), FORMAT["schema"])
    # The SDK's parse(): its strict schema of a pydantic model, its parsed object.
    parsed = client.responses.parse(model=model, input="Forecast?", text_format=Forecast, temperature=0)
    assert isinstance(parsed.output_parsed, Forecast) and parsed.output_parsed.city in ("Paris", "Rome")
    # Any object: the puppet never closes its first key (ties pick "!"), but it starts one.
    obj = client.responses.create(
        model=model, input="Forecast?", text={"format": {"type": "json_object"}}, max_output_tokens=4
    )
    assert obj.text.format.type == "json_object" and obj.output_text.startswith('{"')


def test_function_call_round_trip(client: openai.OpenAI, model: str) -> None:
    question = [{"role": "user", "content": "Weather or time in Paris?"}]
    first = client.responses.create(model=model, input=question, tools=[WEATHER, TIME], temperature=0)
    assert first.status == "completed"
    (call,) = first.output
    check_call(call)
    # The SDK's own output items go back as input, followed by the tool's output.
    followup = [*question, *first.output, {"type": "function_call_output", "call_id": call.call_id, "output": "20C"}]
    second = client.responses.create(model=model, input=followup, tools=[WEATHER, TIME], temperature=0)
    assert second.output[0].type == "message" and second.output_text == ANSWER
    # A named function: its arguments by its schema.
    named = client.responses.create(
        model=model, input=question, tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_weather"}
    )
    (named_call,) = named.output
    assert named_call.name == "get_weather" and check_call(named_call)["city"] in ("Paris", "Rome")
    # tool_choice "none": tools reach the template, the answer is text.
    none = client.responses.create(model=model, input=question, tools=[WEATHER], tool_choice="none", temperature=0)
    assert none.output[0].type == "message"


def test_stream_text_events_in_order(client: openai.OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input="Tell me a story", temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == STORY and len(deltas) == 5
    assert final.status == "completed" and final.output_text == STORY and final.usage.output_tokens == 6
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}
    # cut by max_output_tokens: response.incomplete
    # cut by max_output_tokens: response.incomplete, as OpenAI (the SDK's get_final_response
    # waits for response.completed only)
    with client.responses.stream(model=model, input="Tell me a story", max_output_tokens=3) as stream:
        events = list(stream)
    cut = events[-1]
    assert cut.type == "response.incomplete" and cut.response.incomplete_details.reason == "max_output_tokens"
    assert cut.response.output[0].status == "incomplete" and cut.response.output_text == " Once upon a"


def test_stream_function_call_matches_the_non_streamed_one(client: openai.OpenAI, model: str) -> None:
    request = {"model": model, "input": "Weather?", "tools": [WEATHER, TIME], "temperature": 0}
    with client.responses.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (call,) = final.output
    arguments = check_call(call)
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == arguments and done.item_id == call.id
    (delta,) = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert delta.snapshot == call.arguments  # the SDK's running total of the deltas
    plain = client.responses.create(**request)
    assert [(c.name, c.arguments) for c in plain.output] == [(call.name, call.arguments)]


def test_raw_sse_lines_name_each_event(srv: Server, model: str) -> None:
    body = {"model": model, "input": "Hi", "stream": True, "max_output_tokens": 3}
    with httpx.stream("POST", f"{srv.url}/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert len(names) == len(payloads) and [p["type"] for p in payloads] == names
    assert "data: [DONE]" not in lines


def test_codex_style_request_is_served(srv: Server, model: str) -> None:
    """Fields Codex always sends ask for nothing this server holds: no reasoning items come back."""
    body = {
        "model": model,
        "instructions": "You are a coding agent.",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "3f1c-session",
        "text": {"verbosity": "medium"},
    }
    with httpx.stream("POST", f"{srv.url}/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        payloads = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    final = payloads[-1]
    assert final["type"] == "response.completed"
    assert [item["type"] for item in final["response"]["output"]] == ["function_call"]


def test_agents_sdk_runs_two_tools_to_a_final_answer(srv: Server, model: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    ran: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Weather in a city."""
        ran.append(f"get_weather {city}")
        return "sunny"

    @function_tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        ran.append(f"get_time {zone}")
        return "noon"

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=120, max_retries=0)
        agent = Agent(
            name="forecaster",
            instructions="Answer with the tools.",
            tools=[get_weather, get_time],
            model=OpenAIResponsesModel(model=model, openai_client=client),
            model_settings=ModelSettings(temperature=0, max_tokens=200),
        )
        result = await Runner.run(agent, "Weather and time in Paris?", max_turns=4)
        streamed = Runner.run_streamed(agent, "Weather and time in Paris?", max_turns=4)
        kinds = [event.type async for event in streamed.stream_events()]
        await client.close()
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
        return [result.final_output, streamed.final_output]

    # The puppet's ties always pick the same tool: it calls one, reads its output, and answers.
    assert asyncio.run(run()) == [ANSWER, ANSWER]
    assert len(ran) == 2 and ran[0] == ran[1] and ran[0].split()[0] in ("get_weather", "get_time")


BAD = [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}}, "text.format.schema"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"background": True}, "background"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"temperature": 3}, "temperature"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_input_is_a_400_naming_the_field(client: openai.OpenAI, model: str, extra: dict, param: str) -> None:
    body = {"input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, **body)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error", error
    assert error["param"] == param, error


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="nope", input="Hi")
    assert caught.value.body["param"] == "model" and "`nope`" in caught.value.body["message"]
