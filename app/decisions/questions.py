"""The request's `input` and `questions`, checked and reduced to what the prompt needs.

Shapes follow the `openai` SDK's `decision_create_params` (3.63). Every check raises
`DecisionInputError` naming the field (dotted, as `questions.1.choices`), which the server turns
into a 400 and the fine-tune loop into a data error. Nothing unknown is accepted and ignored: an
unknown key, question type, input item or content part is refused.
"""

import json
from dataclasses import dataclass
from typing import Any, Literal

Value = str | bool
Kind = Literal["predicate", "choice", "score"]

# Predicates are asked as yes/no questions: the probability of "yes" is the answer.
PREDICATE_TEXTS = ("yes", "no")


class DecisionInputError(ValueError):
    """Bad input: `message` says what, `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Option:
    """One answer the model can give: `value` is what the API returns (a choice value, True/False
    for a predicate, a level's label for a score), `text` what the model reads and writes."""

    value: Value
    text: str
    description: str | None = None


@dataclass(frozen=True)
class Question:
    kind: Kind
    name: str | None
    instructions: str
    options: tuple[Option, ...]

    def option_for(self, answer: Any) -> int:
        """The index of the option an answer names (a training label); ValueError if none. Typed:
        the string "true" and the boolean true are different answers."""
        for i, option in enumerate(self.options):
            if type(option.value) is type(answer) and option.value == answer:
                return i
        raise ValueError(f"{answer!r} is none of {[o.value for o in self.options]}")


@dataclass(frozen=True)
class Message:
    """One turn of the input, as text. `role`: system, user or assistant (developer messages are
    system turns)."""

    role: Literal["system", "user", "assistant"]
    text: str


def _fail(message: str, param: str) -> DecisionInputError:
    return DecisionInputError(message, param)


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(f"`{where}.{unknown[0]}` is not a known field here (known: {', '.join(sorted(allowed))})", where)


def _string(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _fail(f"`{where}.{key}` must be a string", f"{where}.{key}")
    return value


def _json_text(part: dict, where: str) -> str:
    data = part.get("data")
    if not isinstance(data, dict | list):
        raise _fail(f"`{where}.data` must be a JSON object or an array of objects", f"{where}.data")
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# Content part types each place accepts (the SDK's unions); images are refused: text-only models.
_TEXT_PART_KEYS = {"type", "text", "prompt_cache_breakpoint"}


def _parts_text(content: Any, where: str, allowed: tuple[str, ...]) -> str:
    """A content string, or its text/JSON parts joined, with images refused (400)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(f"`{where}` must be a string or an array of content parts", where)
    texts = []
    for k, part in enumerate(content):
        at = f"{where}.{k}"
        if not isinstance(part, dict):
            raise _fail(f"`{at}` must be a content part object", at)
        kind = part.get("type")
        if kind == "input_image":
            raise _fail(f"`{at}` is an image; this server's models read text only (input_text, input_json)", at)
        if kind not in allowed:
            raise _fail(f"`{at}.type` is {kind!r}; expected one of {', '.join(allowed)}", f"{at}.type")
        if kind in ("input_text", "output_text"):
            _check_keys(part, _TEXT_PART_KEYS, at)
            texts.append(_string(part, "text", at) or "")
        elif kind == "input_json":
            _check_keys(part, {"type", "data"}, at)
            texts.append(_json_text(part, at))
        else:  # refusal
            _check_keys(part, {"type", "refusal"}, at)
            texts.append(_string(part, "refusal", at) or "")
    return "\n".join(texts)


_MESSAGE_PARTS = {
    "user": ("input_text", "input_json"),
    "developer": ("input_text",),
    "system": ("input_text",),
    "assistant": ("output_text", "refusal"),
}
_CALL_KEYS = {"type", "call_id", "name", "id", "namespace", "status"}
_OUTPUT_KEYS = {"type", "call_id", "output", "id", "status"}


def parse_input(value: Any) -> str | list[Message]:
    """`input`: a non-empty string, or messages, function/custom tool calls and their outputs
    (each output must follow a call with its `call_id`), reduced to text turns."""
    if isinstance(value, str):
        if not value.strip():
            raise _fail("`input` must not be empty", "input")
        return value
    if not isinstance(value, list) or not value:
        raise _fail("`input` must be a non-empty string or a non-empty array of input items", "input")
    messages: list[Message] = []
    calls: set[str] = set()
    for i, item in enumerate(value):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise _fail(f"`{where}` must be an input item object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_PARTS:
                raise _fail(
                    f"`{where}.role` is {role!r}; expected user, developer, system or assistant", f"{where}.role"
                )
            _check_keys(item, {"type", "role", "content", "phase"}, where)
            text = _parts_text(item.get("content"), f"{where}.content", _MESSAGE_PARTS[role])
            messages.append(Message("system" if role == "developer" else role, text))
        elif kind in ("function_call", "custom_tool_call"):
            body_key = "arguments" if kind == "function_call" else "input"
            _check_keys(item, _CALL_KEYS | {body_key}, where)
            call_id = _string(item, "call_id", where) or ""
            name = _string(item, "name", where) or ""
            namespace = _string(item, "namespace", where, required=False)
            body = _string(item, body_key, where)
            calls.add(call_id)
            full = f"{namespace}.{name}" if namespace else name
            messages.append(Message("assistant", f"[call {call_id}] {full}({body})"))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            _check_keys(item, _OUTPUT_KEYS, where)
            call_id = _string(item, "call_id", where) or ""
            if call_id not in calls:
                raise _fail(f"`{where}.call_id` {call_id!r} matches no earlier call in `input`", f"{where}.call_id")
            text = _parts_text(item.get("output"), f"{where}.output", ("input_text",))
            messages.append(Message("user", f"[output of {call_id}] {text}"))
        else:
            raise _fail(
                f"`{where}.type` is {kind!r}: not a known input item (message, function_call, function_call_output, "
                "custom_tool_call, custom_tool_call_output)",
                f"{where}.type",
            )
    return messages


_QUESTION_KEYS = {
    "predicate": {"type", "name", "instructions"},
    "choice": {"type", "name", "instructions", "choices"},
    "score": {"type", "name", "instructions", "levels"},
}


def _value_text(value: Value) -> str:
    return value if isinstance(value, str) else ("true" if value else "false")


def _choice_options(raw: Any, where: str, max_options: int) -> tuple[Option, ...]:
    at = f"{where}.choices"
    if not isinstance(raw, list) or len(raw) < 2:
        raise _fail(f"`{at}` must list at least 2 choices", at)
    if len(raw) > max_options:
        raise _fail(f"`{at}` has {len(raw)} choices; at most {max_options} (TEXTGEN_DECISIONS_MAX_OPTIONS)", at)
    seen: set[tuple[type, Value]] = set()
    values: list[tuple[Value, str | None]] = []
    for k, choice in enumerate(raw):
        c_at = f"{at}.{k}"
        if not isinstance(choice, dict):
            raise _fail(f"`{c_at}` must be an object with a `value`", c_at)
        _check_keys(choice, {"value", "description"}, c_at)
        value = choice.get("value")
        if not isinstance(value, str | bool):
            raise _fail(f"`{c_at}.value` must be a string or a boolean", f"{c_at}.value")
        if isinstance(value, str) and not value.strip():
            raise _fail(f"`{c_at}.value` must not be empty", f"{c_at}.value")
        if (type(value), value) in seen:
            raise _fail(f"`{c_at}.value` {json.dumps(value)} is a duplicate: choices must be unique", f"{c_at}.value")
        seen.add((type(value), value))
        values.append((value, _string(choice, "description", c_at, required=False)))
    texts = [_value_text(v) for v, _ in values]
    # The string "true" and the boolean true are distinct options: where their texts would be the
    # same, the question's strings are written as JSON strings ("true", with quotes).
    quote = len(set(texts)) < len(texts)
    return tuple(
        Option(v, json.dumps(v, ensure_ascii=False) if quote and isinstance(v, str) else _value_text(v), d)
        for v, d in values
    )


def _score_options(raw: Any, where: str, max_options: int) -> tuple[Option, ...]:
    at = f"{where}.levels"
    if not isinstance(raw, list) or len(raw) < 2:
        raise _fail(f"`{at}` must list at least 2 levels", at)
    if len(raw) > max_options:
        raise _fail(f"`{at}` has {len(raw)} levels; at most {max_options} (TEXTGEN_DECISIONS_MAX_OPTIONS)", at)
    options: list[Option] = []
    for k, level in enumerate(raw):
        l_at = f"{at}.{k}"
        if not isinstance(level, dict):
            raise _fail(f"`{l_at}` must be an object with a `label`", l_at)
        _check_keys(level, {"label", "description"}, l_at)
        label = _string(level, "label", l_at) or ""
        if not label.strip():
            raise _fail(f"`{l_at}.label` must not be empty", f"{l_at}.label")
        if any(o.value == label for o in options):
            raise _fail(f"`{l_at}.label` {label!r} is a duplicate: levels must be unique", f"{l_at}.label")
        options.append(Option(label, label, _string(level, "description", l_at, required=False)))
    return tuple(options)


def parse_question(raw: Any, where: str, max_options: int) -> Question:
    """One question object (`where` names it, as `questions.0`)."""
    if not isinstance(raw, dict):
        raise _fail(f"`{where}` must be a question object", where)
    kind = raw.get("type")
    if kind not in _QUESTION_KEYS:
        raise _fail(f"`{where}.type` is {kind!r}: not a question type (predicate, choice, score)", f"{where}.type")
    _check_keys(raw, _QUESTION_KEYS[kind], where)
    name = _string(raw, "name", where, required=False)
    if "instructions" not in raw:
        raise _fail(f"`{where}.instructions` is required", f"{where}.instructions")
    instructions = _parts_text(raw["instructions"], f"{where}.instructions", ("input_text", "input_json")).strip()
    if not instructions:
        raise _fail(f"`{where}.instructions` must not be empty", f"{where}.instructions")
    options: tuple[Option, ...]
    if kind == "predicate":
        options = (Option(True, PREDICATE_TEXTS[0]), Option(False, PREDICATE_TEXTS[1]))
    elif kind == "choice":
        options = _choice_options(raw.get("choices"), where, max_options)
    else:
        options = _score_options(raw.get("levels"), where, max_options)
    return Question(kind, name, instructions, options)


def parse_questions(raw: Any, max_questions: int, max_options: int) -> list[Question]:
    if not isinstance(raw, list) or not raw:
        raise _fail("`questions` must list at least 1 question", "questions")
    if len(raw) > max_questions:
        raise _fail(
            f"`questions` has {len(raw)} questions; at most {max_questions} (TEXTGEN_DECISIONS_MAX_QUESTIONS)",
            "questions",
        )
    return [parse_question(q, f"questions.{i}", max_options) for i, q in enumerate(raw)]
