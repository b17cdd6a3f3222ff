"""ToolCallOutput: held text, parsing and the finish decision, the same for a whole answer and
one fed piece by piece."""

import json

import pytest

from app.api.openai.tools import CALL_CLOSE, CALL_OPEN, ToolCallOutput, collect, tool_plan

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
LOOKUP = {"type": "function", "function": {"name": "lookup"}}
TEMPLATE = "{{ tools }}"


def plan(choice: object, parallel: bool | None = None):  # noqa: ANN201 - ToolPlan
    out = tool_plan([WEATHER, LOOKUP], choice, parallel, TEMPLATE)
    assert out is not None
    return out


def fed(choice: object, pieces: list[str], end: str, parallel: bool | None = None) -> dict:
    """Feed `pieces`, the last with `end`; return what was sent, joined like a client would."""
    out = ToolCallOutput(plan(choice, parallel))
    text, calls, finishes = "", {}, []
    for k, piece in enumerate(pieces):
        step = out.feed(piece, end if k == len(pieces) - 1 else None)  # type: ignore[arg-type]
        text += step.text
        for d in step.calls:
            if d.id is not None:
                assert d.index not in calls
                calls[d.index] = [d.name, ""]
            calls[d.index][1] += d.arguments
        if step.finish is not None:
            finishes.append(step.finish)
    assert len(finishes) == 1 and out.finish == finishes[0]
    sent = {"content": text or None, "calls": [tuple(calls[k]) for k in sorted(calls)], "finish": finishes[0]}
    whole = collect(plan(choice, parallel), "".join(pieces), end)  # type: ignore[arg-type]
    kept = {"content": whole.content or None, "calls": [(c.name, c.arguments) for c in whole.calls]}
    assert kept | {"finish": whole.finish} == sent, "whole and fed answers differ"
    return sent


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_named_arguments_stream_and_finish_as_tool_calls_only_when_they_parse() -> None:
    pieces = ['{"city"', ': "你', '好"}']
    assert fed(NAMED, pieces, "stop") == {
        "content": None,
        "calls": [("get_weather", '{"city": "你好"}')],
        "finish": "tool_calls",
    }
    cut = {"content": None, "calls": [("get_weather", '{"city": "你')], "finish": "length"}
    assert fed(NAMED, pieces[:2], "length") == cut
    assert fed(NAMED, pieces[:2], "stop") == cut  # "stop" with cut JSON is never "tool_calls"
    # Nothing generated at all: still the one call, so the stream and the whole answer agree.
    assert fed(NAMED, [""], "length") == {"content": None, "calls": [("get_weather", "")], "finish": "length"}


def test_named_first_delta_names_the_call_and_later_ones_do_not() -> None:
    out = ToolCallOutput(plan(NAMED))
    first, second = out.feed('{"ci'), out.feed('ty": "x"}', "stop")
    assert first.calls[0].id is not None and first.calls[0].name == "get_weather"
    assert second.calls[0].id is None and second.calls[0].openai() == {
        "index": 0,
        "function": {"arguments": 'ty": "x"}'},
    }
    assert out.calls[0].id == first.calls[0].id


def test_required_calls_are_held_until_complete() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    out = ToolCallOutput(plan("required", parallel=False))
    assert out.feed(call[:10]) == out.feed(call[10:20])  # nothing sent while held
    assert fed("required", [call[:10], call[10:]], "stop", parallel=False) == {
        "content": None,
        "calls": [("get_weather", '{"city": "Paris"}')],
        "finish": "tool_calls",
    }
    assert fed("required", [call[:30]], "length", parallel=False) == {
        "content": call[:30],
        "calls": [],
        "finish": "length",
    }


@pytest.mark.parametrize("cut", [", ", ', {"name": "look', ', {"name": "lookup", "arguments": {}'])
def test_parallel_list_cut_keeps_the_complete_calls(cut: str) -> None:
    first = '{"name": "lookup", "arguments": {"q": "tea"}}'
    text = "[" + first + cut
    assert fed("required", [text[:7], text[7:]], "length") == {
        "content": None,
        "calls": [("lookup", '{"q": "tea"}')],
        "finish": "length",
    }


def test_parallel_list_whole() -> None:
    calls = [{"name": "lookup", "arguments": {"q": "a"}}, {"name": "get_weather", "arguments": {"city": "b"}}]
    out = fed("required", [json.dumps(calls)], "stop")
    assert out["calls"] == [("lookup", '{"q": "a"}'), ("get_weather", '{"city": "b"}')]
    assert out["finish"] == "tool_calls"


def test_unknown_function_is_not_a_call() -> None:
    text = json.dumps({"name": "nope", "arguments": {}})
    assert fed("required", [text], "stop", parallel=False) == {"content": text, "calls": [], "finish": "length"}


def test_auto_free_text_streams_as_it_comes() -> None:
    out = ToolCallOutput(plan("auto"))
    assert out.feed("Hel").text == "Hel"
    assert fed("auto", ["Hel", "lo"], "stop") == {"content": "Hello", "calls": [], "finish": "stop"}
    assert fed("auto", ["", "Hel", "lo"], "length") == {"content": "Hello", "calls": [], "finish": "length"}


def test_auto_tagged_call() -> None:
    call = '{"name": "lookup", "arguments": {"q": "x"}}'
    whole = CALL_OPEN + call + CALL_CLOSE
    assert fed("auto", [whole[:5], whole[5:]], "stop") == {
        "content": None,
        "calls": [("lookup", '{"q": "x"}')],
        "finish": "tool_calls",
    }
    # Cut after the call's JSON but before the closing tag: the call is complete.
    assert fed("auto", [CALL_OPEN + call + "</to"], "length")["calls"] == [("lookup", '{"q": "x"}')]
    # Cut inside the JSON: text, "length".
    cut = CALL_OPEN + call[:12]
    assert fed("auto", [cut], "length") == {"content": cut, "calls": [], "finish": "length"}


def test_auto_grammar_embeds_closed_argument_schemas_unless_the_setting_opens_them() -> None:
    """ "auto"'s Lark grammar carries the call schema itself, so the additionalProperties default
    is applied when the plan is built (JSON specs get it when compiled)."""
    closed = tool_plan([WEATHER], "auto", None, TEMPLATE)
    opened = tool_plan([WEATHER], "auto", None, TEMPLATE, additional_properties=True)
    assert closed is not None and opened is not None
    arguments = '"arguments": {"type": "object", "properties": {"city": {"type": "string"}}'
    assert arguments + ', "additionalProperties": false}' in closed.spec.source
    assert arguments + "}" in opened.spec.source
