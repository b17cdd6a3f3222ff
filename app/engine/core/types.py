"""What callers hand the engine and what it hands back. No HTTP here: the API layer maps these."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from app.engine.core.constraints import Grammar

FinishReason = Literal["length", "eos_token", "stop_sequence", "cancelled", "error"]


class AdapterRef(Protocol):
    """What a sequence holds of its LoRA adapter (`app.engine.models.lora.Adapter`, held from submit until
    it finishes): its name and its load (the prefix cache's namespace). A protocol so the core
    (types, sequence, scheduler) does not import the adapter math."""

    @property
    def name(self) -> str: ...

    @property
    def load_id(self) -> int: ...


class EngineError(Exception):
    """Base for errors the engine raises to callers."""


class QueueFullError(EngineError):
    """The waiting queue is at TEXTGEN_MAX_QUEUE: answer 429 and let the client retry."""


class EngineUnavailableError(EngineError):
    """The engine is not running (loading, draining for shutdown, or dead)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, made by the request model's `to_sampling_params()`.
    Every field is read by app/engine/sample/sampling.py (`SAMPLER_FIELDS`); a new field goes there too
    (docs/design.md, "Adding a sampling parameter"), or a test fails."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0
    min_p: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StoppingParams:
    """`stop` strings are matched against the output text with special tokens' own text kept.
    `include_stop` keeps the matched stop string in the returned text (TGI) instead of cutting
    before it (OpenAI). `stop_token_ids` end generation like EOS (vLLM); `ignore_eos` lets it
    run past EOS."""

    max_new_tokens: int
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class Token:
    """One token rendered in context (app/engine/core/detokenize.py): `text` is what it adds to the
    returned text, `raw` its own UTF-8 bytes there, `top` the most likely candidates at its
    position, each rendered as if it had been chosen there. `logprob` is NaN for a prompt's
    first token."""

    id: int
    text: str
    logprob: float
    special: bool
    top: "list[Token] | None" = None
    raw: bytes = b""


@dataclass(frozen=True)
class Timeline:
    """When one generation reached each stage, in `time.perf_counter()` seconds; 0.0 for a stage
    it never reached (cancelled while queued: no admission, no first token)."""

    arrived: float
    admitted: float
    first_token: float
    finished: float


@dataclass
class Completion:
    """The final state of one generation."""

    text: str
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    tokens: list[Token]
    prefill: list[Token] | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    stop_string: str | None = None  # which of `stop` ended it (finish_reason "stop_sequence")
    queue_time: float = 0.0
    timeline: Timeline | None = None


@dataclass
class Event:
    """One step's output for one request. `token` is the token generated in this step; `tokens`
    are the tokens whose text is now final (held back while they could still turn into a stop
    string) and `text` is their joined text. `prefill` (prompt tokens, when asked for) comes with
    the first event; `completion` is set on the last."""

    token: Token | None
    text: str
    completion: Completion | None = None
    tokens: list[Token] = field(default_factory=list)
    prefill: list[Token] | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    on_event: Callable[[Event], None]
    prefill_details: bool = False
    grammar: "Grammar | None" = None  # structured output: every token must fit it
    adapter: str | None = None  # a loaded LoRA adapter's name; None: the base model
    # With prefill_details: only prompt tokens from this position on need logprobs, so up to
    # `prefill_details_from - 1` leading tokens may come from the prefix cache (their logprobs are
    # NaN then). 0: every prompt token's logprob, no cache (echo, decoder_input_details).
    prefill_details_from: int = 0
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """Thread-safe: the engine drops the sequence at its next step."""
        self.cancelled = True


@dataclass
class EmbedRequest:
    token_ids: list[list[int]]
    normalize: bool
    on_done: Callable[[list[list[float]] | BaseException], None]
