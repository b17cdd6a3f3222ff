"""Tool calling on /v1/chat/completions, by constraining the output to a tool call.

- `tool_choice` {"type": "function", "function": {"name": N}}: the output is N's arguments, a JSON
  object valid against N's `parameters` schema.
- `tool_choice` "required": the output is `{"name": ..., "arguments": {...}}` for one of `tools`
  (arguments by that tool's schema); with `parallel_tool_calls` (OpenAI's default, true) a JSON
  list of one or more such calls, with false exactly one.
- `tool_choice` "auto" (the default when `tools` are sent): free text, or a tool call written as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes/Qwen convention). It needs
  a chat template that renders `tools`, so the model is told about them; otherwise a 400 says so.
- `tool_choice` "none": `tools` reach the template only.

The calls come back as `message.tool_calls` with `finish_reason` "tool_calls"; a call cut short by
`max_tokens` comes back as text with "length".
"""

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import jinja2.meta

from app.api.errors import validation
from app.engine.constraints import GrammarSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolPlan:
    mode: Literal["named", "required", "auto"]
    spec: GrammarSpec
    name: str | None = None  # the named function
    parallel: bool = True


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
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, params in functions.items()
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tool_plan(tools: list[dict] | None, choice: Any, parallel: bool | None, template: str) -> ToolPlan | None:
    """What the request's `tools`/`tool_choice` ask for; None when the output is not constrained."""
    if choice == "none" or (choice is None and not tools):
        return None
    if not tools:
        raise validation("`tool_choice` needs `tools`", "tool_choice")
    functions = _functions(tools)
    parallel = True if parallel is None else parallel
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in functions:
            raise validation(
                f"`tool_choice` must name one of the tools ({', '.join(functions)}); got {json.dumps(choice)}",
                "tool_choice",
            )
        return ToolPlan("named", GrammarSpec.json_schema(functions[name]), name, parallel)
    if choice == "required":
        schema = _call_schema(functions)
        if parallel:
            schema = {"type": "array", "items": schema, "minItems": 1}
        return ToolPlan("required", GrammarSpec.json_schema(schema), None, parallel)
    if choice not in (None, "auto"):
        raise validation("`tool_choice` must be 'none', 'auto', 'required' or a named function", "tool_choice")
    if not template_renders_tools(template):
        raise validation(
            "tool_choice 'auto' needs a chat template that renders `tools` (this one does not, so the model "
            "would never see them): send tool_choice 'required' or a named function, 'none', or start the "
            "server with a TEXTGEN_CHAT_TEMPLATE that renders tools",
            "tool_choice",
        )
    call = json.dumps(_call_schema(functions))
    # Free text that does not start with the tag, or exactly one tagged call.
    lark = f'start: TEXT | call\ncall: "{CALL_OPEN}" %json {call} "{CALL_CLOSE}"\nTEXT: /[^<][\\s\\S]*/\n'
    return ToolPlan("auto", GrammarSpec("lark", lark), None, parallel)


def new_call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_calls(plan: ToolPlan, text: str) -> list[dict] | None:
    """The tool calls in a complete output, or None when it is free text (auto mode)."""
    if plan.mode == "named":
        assert plan.name is not None
        return [new_call(plan.name, text)]
    if plan.mode == "auto":
        if not text.startswith(CALL_OPEN):
            return None
        text = text[len(CALL_OPEN) : -len(CALL_CLOSE)]
    try:
        value = json.loads(text)
        calls = value if isinstance(value, list) else [value]
        return [new_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    except (ValueError, KeyError, TypeError):  # cut by a stop string: it stays text
        return None
