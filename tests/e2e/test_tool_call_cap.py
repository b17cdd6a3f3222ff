"""A weak model that keeps calling under tool_choice "required" (Anthropic "any") with parallel
calls: the grammar closes the list at TEXTGEN_MAX_TOOL_CALLS, so the answer ends `tool_calls`
(`tool_use`, Responses `completed`) with complete calls instead of running into the token limit.
The puppet (tests/scripted_model.py) writes `[` and its first call; the rest of its script does
not fit the grammar, so from there its (tied) choices repeat that call, token by token, until
something stops it: on main, the token limit (`length`, Responses `incomplete`)."""

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from transformers import AutoTokenizer

from tests.e2e.server import Server, start, stop
from tests.scripted_model import build_scripted

TEMPLATE = (
    "{% if tools %}tools: {{ tools | length }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}\n{% endfor %}assistant:"
)
REPEATS = 40
NAMES = [f"ping{k}" for k in range(REPEATS)]
SCRIPT = ["[", f'{{"name": "{NAMES[0]}", "arguments": {{}}}}'] + [
    f', {{"name": "{name}", "arguments": {{}}}}' for name in NAMES[1:]
]
NO_PARAMETERS = {"type": "object", "properties": {}}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": NO_PARAMETERS}} for name in NAMES]
MESSAGES = [{"role": "user", "content": "Ping."}]
MAX_TOKENS = 240  # room for more calls than the cap (a repeated call is ~15 tokens)


@pytest.fixture(scope="module")
def puppet(gpt2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("repeater")
    eos = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir).eos_token_id
    build_scripted(gpt2_tokenizer_dir, out, SCRIPT, end_id=eos, chat_template=TEMPLATE)
    server = start(out, env={"TEXTGEN_SERVED_MODEL_NAME": "rep"}, log_dir=tmp_path_factory.mktemp("logs"))
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def oai(puppet: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{puppet.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_required_ends_with_the_capped_list(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="rep", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS, temperature=0
    )
    choice = out.choices[0]
    calls = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls", ([c.function.name for c in calls], out.usage)
    assert len(calls) == 8, [c.function.name for c in calls]  # the default cap
    assert out.usage is not None and out.usage.completion_tokens < MAX_TOKENS


def test_chat_without_parallel_calls_is_one_call(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="rep",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert out.choices[0].finish_reason == "tool_calls" and len(out.choices[0].message.tool_calls or []) == 1


def test_responses_stream_completes(oai: openai.OpenAI) -> None:
    with oai.responses.stream(
        model="rep",
        input="Ping.",
        tools=[{"type": "function", "name": name, "parameters": NO_PARAMETERS, "strict": True} for name in NAMES],
        tool_choice="required",
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed", final
    assert [item.type for item in final.output] == ["function_call"] * 8, final.output


def test_anthropic_any_ends_tool_use(puppet: Server) -> None:
    client = anthropic.Anthropic(base_url=puppet.url, api_key="unused", max_retries=0, timeout=120)
    out = client.messages.create(
        model="rep",
        max_tokens=MAX_TOKENS,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[{"name": name, "input_schema": NO_PARAMETERS} for name in NAMES],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    assert out.stop_reason == "tool_use", out
    assert [b.type for b in out.content] == ["tool_use"] * 8, out.content
