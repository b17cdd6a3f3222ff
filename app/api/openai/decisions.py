"""POST /v1/decisions: OpenAI's Decisions API, in the `openai` SDK's schema (3.63), for any
causal LM served here (the base model or a LoRA adapter).

Each question's prompt (app/decisions/prompt.py) is prefilled once, through the prefix cache,
then every option's continuation is run as prompt + option with prompt logprobs from the option
on (`prefill_details_from`), all options of all questions batched in the engine. An option's score
is the sum of its tokens' logprobs; app/decisions/score.py turns scores into answers.
"""

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.api.errors import APIError, validation
from app.api.generation import ContextDep, Generation, run_to_completion
from app.api.openai.chat import chat_template_of
from app.api.openai.common import ERRORS, adapter_of, check_model
from app.api.schemas import RequestModel
from app.decisions.calibration import read_temperature, recorded_template_hash, template_hash
from app.decisions.prompt import Encoded, encode
from app.decisions.questions import DecisionInputError, Question, parse_input, parse_questions
from app.decisions.score import answer, normalise
from app.engine.core.types import Completion, SamplingParams, StoppingParams
from app.service import Service

router = APIRouter(tags=["OpenAI"])
log = logging.getLogger("textgen")


class DecisionRequest(RequestModel):
    """The SDK's `DecisionCreateParams`. `input` and `questions` are checked in
    app/decisions/questions.py (errors name the field); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    input: str | list[Any] = Field(description="A string, or messages, function and custom tool calls and outputs.")
    questions: list[Any] = Field(description="Predicate, choice or score questions; answers come in this order.")
    prompt_cache_key: str | None = Field(None, description="Logged; the prefix cache is shared and automatic.")
    prompt_cache_options: dict[str, Any] | None = Field(
        None, description="Refused unless null: the prefix cache is automatic (no explicit breakpoints)."
    )
    safety_identifier: str | None = Field(None, description="Logged in the access log.")


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class DecisionUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ChoiceProbability(BaseModel):
    value: str | bool
    probability: float


class LevelProbability(BaseModel):
    label: str
    value: int
    probability: float


class PredicateAnswer(BaseModel):
    type: Literal["predicate"]
    name: str | None
    probability: float


class ChoiceAnswer(BaseModel):
    type: Literal["choice"]
    name: str | None
    choice: str | bool
    confidence: float
    probabilities: list[ChoiceProbability]


class ScoreAnswer(BaseModel):
    type: Literal["score"]
    name: str | None
    score: float
    confidence: float
    probabilities: list[LevelProbability]


Answer = Annotated[PredicateAnswer | ChoiceAnswer | ScoreAnswer, Field(discriminator="type")]


class DecisionResponse(BaseModel):
    answers: list[Answer]
    model: str
    usage: DecisionUsage


def temperature_of(service: Service, adapter: str | None) -> float:
    """The calibrated temperature `textgen finetune --task decisions` saved with the adapter (1.0
    for the base model or an adapter without one). A 400 naming `model` when the adapter records
    a chat template (by hash) other than the one this server renders prompts with: its scores
    were calibrated on other prompts."""
    if adapter is None or service.engine is None:
        return 1.0
    loaded = service.engine.adapters.get(adapter)
    if loaded is None:
        return 1.0
    try:
        recorded, trained_with = recorded_template_hash(Path(loaded.path))
        temperature = read_temperature(Path(loaded.path))
    except (ValueError, OSError) as exc:
        raise APIError(500, f"adapter {adapter!r} has a bad calibration file: {exc}", "internal") from exc
    serving = template_hash(chat_template_of(service))
    if recorded and trained_with != serving:
        trained = f"chat template sha256 {trained_with[:12]}…" if trained_with else "no chat template"
        here = f"chat template sha256 {serving[:12]}…" if serving else "no chat template (completion style)"
        raise validation(
            f"adapter {adapter!r} was fine-tuned on prompts rendered with {trained}, but this server renders "
            f"with {here} (TEXTGEN_CHAT_TEMPLATE, else the tokenizer's): its decisions would be scored on "
            "prompts it never saw. Start the server with the template the adapter was trained with, or "
            "fine-tune again with --chat-template set to this server's template file",
            "model",
        )
    return temperature


def _encode_all(service: Service, value: str | list, questions: list[Question]) -> list[Encoded]:
    assert service.loaded is not None
    template = chat_template_of(service)
    return [encode(service.loaded.tokenizer, template, value, q) for q in questions]


def _check_lengths(service: Service, encoded: list[Encoded]) -> None:
    """Every prompt + option must fit the model's limits with the one token the engine samples."""
    assert service.loaded is not None
    limits = service.loaded.limits
    for i, e in enumerate(encoded):
        longest = len(e.prompt) + max(len(o) for o in e.options)
        if longest > limits.max_input_tokens or longest + 1 > limits.max_total_tokens:
            raise validation(
                f"`input` with `questions.{i}` needs {longest} tokens (prompt + its longest option); at most "
                f"{min(limits.max_input_tokens, limits.max_total_tokens - 1)} fit (TEXTGEN_MAX_INPUT_TOKENS)",
                "input",
            )


def _submit(ctx: Any, ids: list[int], start: int, adapter: str | None) -> Generation:
    # Greedy and one token: the sampled token is discarded; only the prompt logprobs are read.
    return Generation(
        ctx,
        ids,
        SamplingParams(),
        StoppingParams(1),
        prefill_details=start > 0,
        adapter=adapter,
        prefill_details_from=start,
    )


def option_sum(completion: Completion, start: int) -> float:
    """The sum of the prompt logprobs of tokens `start`.. (the option), left to right."""
    assert completion.prefill is not None
    return sum(t.logprob for t in completion.prefill[start:])


@router.post("/v1/decisions", response_model=DecisionResponse, responses=ERRORS)
async def decisions(body: DecisionRequest, request: Request, ctx: ContextDep) -> DecisionResponse:
    """Answer predicate, choice and score questions about `input` with the probability of every
    option (see docs/api.md, "Decisions")."""
    service = ctx.service
    model = check_model(service, body.model)
    if body.prompt_cache_options is not None:
        raise validation(
            "`prompt_cache_options` is not supported: the prefix cache is automatic; omit it or send null",
            "prompt_cache_options",
        )
    settings = service.settings
    try:
        questions = parse_questions(body.questions, settings.decisions_max_questions, settings.decisions_max_options)
        value = parse_input(body.input)
        encoded = await run_in_threadpool(_encode_all, service, value, questions)  # tokenizing is slow work
    except DecisionInputError as exc:
        raise validation(exc.message, exc.param) from None
    _check_lengths(service, encoded)
    runs_needed = sum(len(e.options) for e in encoded)
    if runs_needed > settings.max_queue:
        # Every option is one engine request: more than the queue holds could never be admitted.
        raise validation(
            f"`questions` have {runs_needed} options in all; at most {settings.max_queue} fit in one request "
            "(each option is one engine request: TEXTGEN_MAX_QUEUE)",
            "questions",
        )
    adapter = adapter_of(service, model)
    temperature = temperature_of(service, adapter)
    ctx.usage["prompt"] = body.input
    ctx.usage["log_fields"] = {
        k: v
        for k, v in (("prompt_cache_key", body.prompt_cache_key), ("safety_identifier", body.safety_identifier))
        if v is not None
    }
    results: list[Completion] = []
    if service.engine is not None and service.engine.prefix is not None:
        # Each question's prompt once: its full blocks go to the prefix cache, and every option
        # below reads them from there (all but the prompt's last partial block and the option).
        prompts = [_submit(ctx, e.prompt, 0, adapter) for e in encoded]
        results += await run_to_completion(request, prompts)
    runs = [_submit(ctx, e.prompt + o, len(e.prompt), adapter) for e in encoded for o in e.options]
    options = await run_to_completion(request, runs)
    results += options
    answers = []
    k = 0
    for q, e in zip(questions, encoded, strict=True):
        sums = [option_sum(c, len(e.prompt)) for c in options[k : k + len(e.options)]]
        k += len(e.options)
        answers.append(answer(q, normalise(sums, temperature)))
    input_tokens = sum(c.prompt_tokens for c in results)
    cached = sum(c.cached_tokens for c in results)
    usage = DecisionUsage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=0,
        output_tokens_details=OutputTokensDetails(),
        total_tokens=input_tokens,
    )
    return DecisionResponse.model_validate({"answers": answers, "model": model, "usage": usage})
