"""Tool calling, by constraining the output to a tool call, and the one piece that turns that
output into text and tool calls for every route family.

What the model must write (`tool_plan`):
- a named function (OpenAI `tool_choice` {"type": "function", "function": {"name": N}}): N's
  arguments, a JSON object valid against N's `parameters` schema;
- "required": `{"name": ..., "arguments": {...}}` for one of `tools` (keys in that order, as
  models write them); with `parallel_tool_calls` (OpenAI's default, true) a JSON list of one to
  TEXTGEN_MAX_TOOL_CALLS such calls (vLLM's list has no bound, so a weak model that repeats a
  call runs to the token limit; the bound ends the list with complete calls), with false exactly one;
- "auto" (the default when `tools` are sent): free text, or a tool call written as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes/Qwen convention). It needs
  a chat template that renders `tools`, so the model is told about them; otherwise a 400 says so;
- "none": `tools` reach the template only.

How that output comes back (`ToolCallOutput`, the same for streamed and whole answers, so both
have one shape): a finish reason "tool_calls" only when every returned call's arguments parse.
When the output was cut (`max_tokens`, or a stop string inside the constrained output), the
finish reason is "length" and the calls that are complete still come back as calls; a named
function's arguments stream as they are generated, so its cut call comes back with the
arguments written so far (not valid JSON), as OpenAI does when `max_tokens` cuts a call.
"""

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
import jinja2.meta

from app.api.errors import validation
from app.engine.core.constraints import GrammarSpec, closed_objects

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

# How a generation ended, family-neutral ("length" also for a stop string that cut constrained
# output: see app/api/openai/common.finish_of), and how its answer ends.
EndReason = Literal["stop", "length"]
AnswerFinish = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class ToolPlan:
    mode: Literal["named", "required", "auto"]
    spec: GrammarSpec
    name: str | None = None  # the named function
    parallel: bool = True
    functions: tuple[str, ...] = ()  # the tools' names


def _functions(tools: list[dict]) -> dict[str, dict]:
    """Tool name -> parameters schema; a 400 naming the bad tool otherwise."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise validation(f"`tools[{i}]` must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise validation(f"`tools[{i}].function.name` must be a non-empty string", "tools")
        params = fn.get("parameters", NO_PARAMETERS)
        if not isinstance(params, dict):
            raise validation(f"`tools[{i}].function.parameters` must be a JSON schema object", "tools")
        out[name] = params
    return out


def template_renders_tools(template: str) -> bool:
    """Whether the chat template reads the `tools` variable."""
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:
        return False


def _call_schema(functions: dict[str, dict]) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},  # name first, as models write
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, params in functions.items()
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tool_plan(
    tools: list[dict] | None,
    choice: Any,
    parallel: bool | None,
    template: str,
    additional_properties: bool = False,
    max_calls: int | None = None,
) -> ToolPlan | None:
    """What the request's `tools`/`tool_choice` ask for (OpenAI chat's shapes); None when the
    output is not constrained. `additional_properties` is TEXTGEN_JSON_ADDITIONAL_PROPERTIES: JSON
    specs get it when compiled, but "auto"'s Lark grammar embeds the call schema, so it is
    applied here. `max_calls` (TEXTGEN_MAX_TOOL_CALLS; None: no bound) caps the list of parallel
    "required" calls. Raises a 400 APIError naming the field."""
    if choice == "none" or (choice is None and not tools):
        return None
    if not tools:
        raise validation("`tool_choice` needs `tools`", "tool_choice")
    functions = _functions(tools)
    names = tuple(functions)
    parallel = True if parallel is None else parallel
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in functions:
            raise validation(
                f"`tool_choice` must name one of the tools ({', '.join(functions)}); got {json.dumps(choice)}",
                "tool_choice",
            )
        return ToolPlan("named", GrammarSpec.json_schema(functions[name]), name, parallel, names)
    if choice == "required":
        schema = _call_schema(functions)
        if parallel:
            schema = {"type": "array", "items": schema, "minItems": 1}
            if max_calls is not None:
                schema["maxItems"] = max_calls
        return ToolPlan("required", GrammarSpec.json_schema(schema), None, parallel, names)
    if choice not in (None, "auto"):
        raise validation("`tool_choice` must be 'none', 'auto', 'required' or a named function", "tool_choice")
    if not template_renders_tools(template):
        raise validation(
            "tool_choice 'auto' needs a chat template that renders `tools` (this one does not, so the model "
            "would never see them): send tool_choice 'required' or a named function, 'none', or start the "
            "server with a TEXTGEN_CHAT_TEMPLATE that renders tools",
            "tool_choice",
        )
    schema = _call_schema(functions)
    call = json.dumps(schema if additional_properties else closed_objects(schema))
    # Free text that does not start with the tag, or exactly one tagged call.
    lark = f'start: TEXT | call\ncall: "{CALL_OPEN}" %json {call} "{CALL_CLOSE}"\nTEXT: /[^<][\\s\\S]*/\n'
    return ToolPlan("auto", GrammarSpec("lark", lark), None, parallel, names)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One complete call: `arguments` is JSON text (valid JSON unless the answer was cut)."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict:
        """OpenAI chat's `message.tool_calls[i]`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class CallDelta:
    """A piece of call `index`: its first piece carries `id` and `name`; the `arguments` pieces
    join to the call's arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict:
        """OpenAI chat's streamed `delta.tool_calls[i]`."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass
class Step:
    """What to send for one fed piece: content `text`, call pieces, and on the last step the
    answer's finish reason."""

    text: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    finish: AnswerFinish | None = None


class ToolCallOutput:
    """One choice's output under a ToolPlan, fed piece by piece as the engine releases it.

    `feed(text, end)` takes the next released text and, on the last piece, how the generation
    ended ("stop" or "length"); it returns the `Step` to send: content text, call pieces, and
    with `end` the answer's finish ("stop", "length" or "tool_calls"). After the last piece,
    `content` and `calls` hold the whole answer. A whole (non-streamed) answer is one `feed`
    (see `collect`), so streamed and whole answers come from the same code.

    - named: every piece of text is a piece of the one call's arguments (sent at once);
    - required: text is held until the end, then parsed: all calls, or when cut the complete
      ones (a cut list of calls keeps the calls before the cut one), else the text as content;
    - auto: text that does not start with `<tool_call>` is content, sent as it comes; a call is
      held and parsed like required.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.content: str | None = None
        self.calls: list[ToolCall] = []
        self._held = ""
        self._free: bool | None = None if plan.mode == "auto" else False  # auto: decided by the first char
        self._named_id = new_call_id()
        self._named_started = False
        self._named_args = ""
        self.finish: AnswerFinish | None = None

    def feed(self, text: str, end: EndReason | None = None) -> Step:
        if self.plan.mode == "named":
            return self._feed_named(text, end)
        if self._free is None and text:
            self._free = not text.startswith("<")
        if self._free:
            self.content = (self.content or "") + text
            if end is not None:
                self.finish = end
            return Step(text, [], self.finish)
        self._held += text
        if end is None:
            return Step()
        return self._finish_held(end)

    def _feed_named(self, text: str, end: EndReason | None) -> Step:
        assert self.plan.name is not None
        deltas = []
        if text or (end is not None and not self._named_started):
            first = not self._named_started
            self._named_started = True
            self._named_args += text
            deltas.append(CallDelta(0, text, self._named_id if first else None, self.plan.name if first else None))
        if end is None:
            return Step("", deltas)
        self.calls = [ToolCall(self._named_id, self.plan.name, self._named_args)]
        self.finish = "tool_calls" if end == "stop" and _is_object(self._named_args) else "length"
        return Step("", deltas, self.finish)

    def _finish_held(self, end: EndReason) -> Step:
        text = self._held
        body = text
        if self.plan.mode == "auto":
            body = text.removeprefix(CALL_OPEN)
            if end == "stop" and body.endswith(CALL_CLOSE):
                body = body[: -len(CALL_CLOSE)]
        calls, whole = _parse_calls(body, self.plan)
        if whole and end == "stop" and calls:
            self.finish = "tool_calls"
        else:
            self.finish = "length"
        if not calls:
            self.content = text
            return Step(text, [], self.finish)
        self.calls = [ToolCall(new_call_id(), name, args) for name, args in calls]
        deltas = [CallDelta(k, c.arguments, c.id, c.name) for k, c in enumerate(self.calls)]
        return Step("", deltas, self.finish)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _call_of(value: Any, plan: ToolPlan) -> tuple[str, str] | None:
    if not isinstance(value, dict) or value.get("name") not in plan.functions:
        return None
    arguments = value.get("arguments")
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _parse_calls(text: str, plan: ToolPlan) -> tuple[list[tuple[str, str]], bool]:
    """The (name, arguments) of the complete calls at the start of `text` (one call, or a JSON
    list of them), and whether `text` is exactly those calls (nothing cut or left over)."""
    decoder = json.JSONDecoder()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    else:
        values = value if isinstance(value, list) else [value]
        calls = [c for v in values if (c := _call_of(v, plan)) is not None]
        return calls, len(calls) == len(values) and bool(calls)
    # Cut: keep the calls that are complete before the cut.
    stripped = text.lstrip()
    if not stripped.startswith("["):
        try:
            value, _ = decoder.raw_decode(stripped)
        except ValueError:
            return [], False
        call = _call_of(value, plan)
        return ([call] if call else []), False
    out: list[tuple[str, str]] = []
    pos = 1
    while True:
        while pos < len(stripped) and stripped[pos] in " \n\r\t,":
            pos += 1
        try:
            value, pos = decoder.raw_decode(stripped, pos)
        except ValueError:
            return out, False
        call = _call_of(value, plan)
        if call is None:
            return out, False
        out.append(call)


def end_reason(finish: str | None) -> EndReason | None:
    """A finish reason ("stop" or "length"; None while generating) as an EndReason."""
    return None if finish is None else "length" if finish == "length" else "stop"


def collect(plan: ToolPlan, text: str, end: EndReason) -> ToolCallOutput:
    """A whole answer: `content`, `calls` and `finish` of the returned output."""
    out = ToolCallOutput(plan)
    out.feed(text, end)
    return out
