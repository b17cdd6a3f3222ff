"""The prompt a question is asked with, and the token ids of each option after it.

Two formats, chosen by the model (the server and `textgen finetune --task decisions` use the same
functions, so an adapter is trained on exactly the prompts it is later asked):

- **Completion style** (no chat template: GPT-2, the demo model, stories260k). The text is

      <input>

      Question: <instructions>
      Options:
      - <option>: <description>
      - <option>
      Answer:

  and option k is scored as the continuation " <option k>\\n" (the newline ends the answer, so an
  option that is a prefix of another, "pos" and "positive", is not favoured). A string input is
  used verbatim; messages become "User: ..." / "Assistant: ..." / "System: ..." lines. Predicates
  read "Statement: <instructions>" and "Is the statement true?" with the options yes and no; score
  questions list their levels under "Levels, lowest first:". The tokenizer's BOS, if it adds one,
  comes first.
- **Chat template** (the tokenizer's, or TEXTGEN_CHAT_TEMPLATE): the input's messages (a string
  input is one user message) and a last user message with the same question block and "Answer
  with one option, exactly as written.", rendered with the generation prompt; option k is its text
  followed by what the template writes after an assistant message (its end-of-turn), else the
  tokenizer's EOS.

Option ids are the tokens of prompt + option tokenized together, past the prompt's own ids (so an
option is tokenized as it would be in context); where that split does not hold (a merge across
the boundary), the option is tokenized alone.
"""

from dataclasses import dataclass
from typing import Any

from app.decisions.questions import DecisionInputError, Message, Question

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_SENTINEL = "\u2063DECISION\u2063"  # an answer no template changes, to find the end-of-turn text


@dataclass(frozen=True)
class Encoded:
    """One question's ids: the shared prompt, and each option's continuation after it."""

    prompt: list[int]
    options: list[list[int]]


def question_block(question: Question) -> str:
    lines = []
    if question.kind == "predicate":
        lines += [f"Statement: {question.instructions}", "Is the statement true?", "Options:"]
    elif question.kind == "score":
        lines += [f"Question: {question.instructions}", "Levels, lowest first:"]
    else:
        lines += [f"Question: {question.instructions}", "Options:"]
    for option in question.options:
        lines.append(f"- {option.text}: {option.description}" if option.description else f"- {option.text}")
    return "\n".join(lines)


def input_text(value: str | list[Message]) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{ROLE_NAMES[m.role]}: {m.text}" for m in value)


def completion_prompt(value: str | list[Message], question: Question) -> str:
    return f"{input_text(value)}\n\n{question_block(question)}\nAnswer:"


def _conversation(value: str | list[Message], question: Question) -> list[dict[str, str]]:
    ask = f"{question_block(question)}\nAnswer with one option, exactly as written."
    if isinstance(value, str):
        return [{"role": "user", "content": f"{value}\n\n{ask}"}]
    return [*({"role": m.role, "content": m.text} for m in value), {"role": "user", "content": ask}]


def _render(tokenizer: Any, template: str, conversation: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # a template that rejects these turns (e.g. role order)
        raise DecisionInputError(f"the chat template could not render `input`: {exc}", "input") from exc


def end_of_turn(tokenizer: Any, template: str, conversation: list[dict[str, str]], prompt: str) -> str:
    """What the template writes after an assistant answer (e.g. "<|im_end|>\\n"), else EOS."""
    full = _render(tokenizer, template, [*conversation, {"role": "assistant", "content": _SENTINEL}], False)
    head = prompt + _SENTINEL
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.eos_token or ""


def encode(tokenizer: Any, template: str | None, value: str | list[Message], question: Question) -> Encoded:
    """The ids of `question` about `value` (from `parse_input`) for a tokenizer and chat template
    (None: completion style)."""
    if template is None:
        prompt = completion_prompt(value, question)
        continuations = [f" {option.text}\n" for option in question.options]
        special = True
    else:
        conversation = _conversation(value, question)
        prompt = _render(tokenizer, template, conversation, True)
        end = end_of_turn(tokenizer, template, conversation, prompt)
        continuations = [option.text + end for option in question.options]
        special = False  # the rendered text holds any BOS the template wants
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    options = []
    for text in continuations:
        full = tokenizer(prompt + text, add_special_tokens=special)["input_ids"]
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            options.append(full[len(prompt_ids) :])
        else:
            options.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Encoded(prompt_ids, options)
