"""Each route family's request model maps every sampling field it accepts into SamplingParams, and
every SamplingParams field can be set by some family. A request field named as a SamplingParams
field (or listed in its family's aliases) that `to_sampling_params` forgets fails here."""

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from app.api.anthropic.convert import to_chat
from app.api.anthropic.protocol import MessagesRequest
from app.api.errors import APIError
from app.api.ollama.convert import sampling_fields
from app.api.ollama.protocol import Options
from app.api.openai.protocol import ChatRequest, CompletionRequest
from app.api.openai.responses import chat_request
from app.api.openai.responses_protocol import ResponsesRequest
from app.api.schemas import GenerateParameters
from app.engine.core.types import SamplingParams

VOCAB = 100
MESSAGES = [{"role": "user", "content": "hi"}]
PARAMS = {f.name for f in dataclasses.fields(SamplingParams)}

# A family: its request model (whose fields are walked), how a request becomes SamplingParams, and
# request fields named otherwise than the SamplingParams field they set (with fields they need).
Family = tuple[type[BaseModel], Callable[[dict[str, Any]], SamplingParams], dict[str, tuple[str, dict[str, Any]]]]

FAMILIES: dict[str, Family] = {
    "openai-completions": (
        CompletionRequest,
        lambda f: CompletionRequest(model="m", prompt="x", **f).to_sampling_params(VOCAB),
        {"logprobs": ("top_logprobs", {})},
    ),
    "openai-chat": (
        ChatRequest,
        lambda f: ChatRequest(model="m", messages=MESSAGES, **f).to_sampling_params(VOCAB),
        {"top_logprobs": ("top_logprobs", {"logprobs": True})},
    ),
    "tgi": (
        GenerateParameters,
        lambda f: GenerateParameters(**f).to_sampling_params(),
        {"top_n_tokens": ("top_logprobs", {})},
    ),
    "anthropic": (
        MessagesRequest,
        lambda f: to_chat(MessagesRequest(model="m", max_tokens=5, messages=MESSAGES, **f), "m").to_sampling_params(
            VOCAB
        ),
        {},
    ),
    "responses": (
        ResponsesRequest,
        lambda f: chat_request(ResponsesRequest(model="m", input="hi", **f)).to_sampling_params(VOCAB),
        {},
    ),
    "ollama-options": (
        Options,
        lambda f: ChatRequest(model="m", messages=MESSAGES, **sampling_fields(Options(**f))).to_sampling_params(VOCAB),
        {"repeat_penalty": ("repetition_penalty", {})},
    ),
}


def probe(target: str) -> Any:
    """A request value for SamplingParams field `target` that is valid on every route and not a default."""
    return {"do_sample": True, "logit_bias": {"1": 5.0}}.get(
        target, 3 if target in ("top_k", "seed", "top_logprobs") else 0.5
    )


def sampling_fields_of(family: Family) -> dict[str, tuple[str, dict[str, Any]]]:
    """The request model's fields that set a SamplingParams field: same name, or an alias."""
    model, _, aliases = family
    named = {name: (name, {}) for name in model.model_fields if name in PARAMS}
    return {**named, **{k: v for k, v in aliases.items() if k in model.model_fields}}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sampling_field_a_family_accepts_is_mapped(family: str) -> None:
    _, convert, _ = FAMILIES[family]
    default = convert({})
    for name, (target, needs) in sampling_fields_of(FAMILIES[family]).items():
        value = probe(target)
        try:
            mapped = convert({name: value, **needs})
        except APIError as exc:  # refused clearly, naming the field, is allowed (Ollama's typical_p)
            assert name in (exc.param or ""), f"{family}: `{name}` refused without naming it: {exc.message}"
            continue
        assert getattr(mapped, target) != getattr(default, target), (
            f"{family}: `{name}`={value!r} does not reach SamplingParams.{target}: to_sampling_params forgets it"
        )


def test_every_sampling_param_is_reachable_from_some_family() -> None:
    reachable = {target for family in FAMILIES.values() for target, _ in sampling_fields_of(family).values()}
    assert reachable == PARAMS, f"no route sets SamplingParams {PARAMS - reachable}: add it to a request model"
