"""The Responses -> chat conversion (app/api/openai/responses.py), without a server."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import cast

import pytest

from app.api.errors import APIError, validation
from app.api.generation import Generation
from app.api.openai.responses import (
    Echo,
    chat_request,
    messages_of,
    output_items,
    response_format_of,
    responses_names,
    stream_events,
    tool_choice_of,
    tools_of,
)
from app.api.openai.responses_protocol import ResponsesRequest
from app.api.openai.tools import tool_plan
from app.engine.core.types import Event

TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}, "strict": True}


def body(**fields: object) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


def test_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me look"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    ]
    messages = messages_of(body(instructions="sys", input=items))
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert messages == [
        {"role": "system", "content": "sys\n\nrules"},
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "content": "let me look",
            "tool_calls": [
                {"id": "c1", **call},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c3", **call}]},
        {"role": "assistant", "content": "no"},
    ]
    assert messages_of(body(input="hi")) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("items", "param"),
    [
        ([{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}], "input[0].content[0]"),
        ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text"),
        ([{"role": "user", "content": 3}], "input[0].content"),
        ([{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}], "input[0].content[0]"),
        ([{"type": "reasoning", "summary": []}], "input[0].type"),
        ([{"type": "function_call", "call_id": "c", "arguments": "{}"}], "input[0].name"),
        ([{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}], "input[0].output[0]"),
        ([], "input"),
    ],
)
def test_bad_items_name_the_field(items: list, param: str) -> None:
    with pytest.raises(APIError) as caught:
        messages_of(body(input=items))
    assert caught.value.param == param


def test_tools_choice_and_format_convert() -> None:
    assert tools_of([TOOL]) == [
        {"type": "function", "function": {"name": "f", "parameters": TOOL["parameters"], "strict": True}}
    ]
    assert tool_choice_of({"type": "function", "name": "f"}) == {"type": "function", "function": {"name": "f"}}
    assert tool_choice_of("required") == "required"
    assert response_format_of({"type": "json_schema", "name": "n", "schema": {"type": "object"}}) == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"type": "object"}},
    }
    assert response_format_of({"type": "text"}) == {"type": "text"}
    chat = chat_request(body(input="q", tools=[TOOL], max_output_tokens=7, temperature=0))
    assert chat.max_tokens == 7 and chat.temperature == 0 and chat.tools == tools_of([TOOL])
    assert chat.top_p == 1.0 and chat.n == 1 and not chat.stream


def test_chat_errors_are_renamed() -> None:
    with pytest.raises(APIError) as caught, responses_names():
        raise validation("`messages` tokens + `max_tokens` must be <= 8", "max_tokens")
    assert caught.value.param == "max_output_tokens"
    assert caught.value.message == "`input` tokens + `max_output_tokens` must be <= 8"
    with pytest.raises(APIError) as caught, responses_names():
        raise APIError(413, "needs more KV cache", "payload_too_large", "max_new_tokens")
    assert caught.value.param == "max_output_tokens" and caught.value.status == 413


def test_output_items() -> None:
    plan = tool_plan(tools_of([TOOL]), "required", False, "{{ tools }}")
    (call,) = output_items(plan, '{"name": "f", "arguments": {}}', "stop")
    assert call["type"] == "function_call" and call["name"] == "f" and call["arguments"] == "{}"
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    (message,) = output_items(plan, '{"name": "f", "argu', "length")
    assert message["type"] == "message" and message["status"] == "incomplete"
    (text,) = output_items(None, "hi", "stop")
    assert text["content"][0] == {"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}


class _Generation:
    """Stands in for the engine's side of one generation: some text, then an error (a timeout)."""

    async def events(self) -> AsyncIterator[Event]:
        yield Event(token=None, text="Hi")
        raise APIError(504, "request timed out after 1 s (TEXTGEN_REQUEST_TIMEOUT)", "timeout")

    def cancel(self) -> None:
        pass


def test_an_error_mid_stream_is_an_error_event() -> None:
    async def collect() -> list[str]:
        echo = Echo(body(input="q"), "m")
        generations = cast(list[Generation], [_Generation()])
        return [chunk async for chunk in stream_events(echo, generations, 3, None)]

    chunks = asyncio.run(collect())
    names = [chunk.split("\n")[0].removeprefix("event: ") for chunk in chunks]
    payloads = [json.loads(chunk.split("\n")[1].removeprefix("data: ")) for chunk in chunks]
    assert (
        names
        == [p["type"] for p in payloads]
        == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "error",
        ]
    )
    assert [p["sequence_number"] for p in payloads] == list(range(6))
    assert payloads[-1]["code"] == "timeout" and "timed out" in payloads[-1]["message"]
