"""One request's decoding state: generated ids, text, stop conditions, and its random generator."""

import secrets
import time

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.engine.detokenize import IncrementalDetokenizer
from app.engine.types import Completion, Event, FinishReason, GenerationRequest, Timeline, Token


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        special_ids: frozenset[int],
        max_total_tokens: int,
        device: torch.device,
    ) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.special_ids = special_ids
        self.max_total_tokens = max_total_tokens
        self.arrived = time.perf_counter()
        self.admitted = 0.0
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.generated: list[int] = []
        self.tokens: list[Token] = []
        self.prefill: list[Token] | None = None
        self.text = ""
        self.emitted = 0
        self.finish_reason: FinishReason | None = None
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        sampling = request.sampling
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if sampling.do_sample:
            self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # The stop string that may straddle the newest text is never longer than this.
        self._stop_window = max((len(s) for s in request.stopping.stop), default=0)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.request.stopping.max_new_tokens

    @property
    def eos_allowed(self) -> bool:
        return len(self.generated) >= self.request.stopping.min_new_tokens

    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.generated

    def append(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> Event:
        """Record one sampled token, update the text and stop state, and build its event."""
        if not self.generated:
            self.first_token_at = time.perf_counter()
        self.generated.append(token_id)
        if token_id in self.eos_ids and self.eos_allowed:
            self.finish_reason = "eos_token"
        elif (
            len(self.generated) >= self.request.stopping.max_new_tokens
            or self.prompt_len + len(self.generated) >= self.max_total_tokens
        ):
            self.finish_reason = "length"
        piece = self.detok.add(token_id)
        if self.finished:
            piece += self.detok.flush()
        special = token_id in self.special_ids
        token_text = self.tokenizer.convert_ids_to_tokens(token_id) if special else piece
        token = Token(token_id, token_text, logprob, special, self._named(top))
        self.tokens.append(token)
        self._extend_text(piece)
        return Event(token, self._take_final_text(), self.completion() if self.finished else None)

    def _extend_text(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self._stop_window + 1)
        self.text += piece
        hits = [p for p in (self.text.find(s, start) for s in self.request.stopping.stop) if p >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop_sequence"

    def _take_final_text(self) -> str:
        """Text that can no longer become part of a stop string; all of it once finished."""
        end = len(self.text)
        if not self.finished:
            for stop in self.request.stopping.stop:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.emitted)
        chunk, self.emitted = self.text[self.emitted : end], end
        return chunk

    def _named(self, top: list[tuple[int, float]] | None) -> list[tuple[int, str, float]] | None:
        if top is None:
            return None
        return [(i, self.tokenizer.decode([i]), lp) for i, lp in top]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self, error: str | None = None) -> Completion:
        return Completion(
            text=self.text,
            finish_reason=self.finish_reason or "error",
            generated_tokens=len(self.generated),
            prompt_tokens=self.prompt_len,
            seed=self.seed,
            tokens=self.tokens,
            prefill=self.prefill,
            error=error,
            queue_time=max(0.0, self.admitted - self.arrived),
            timeline=Timeline(self.arrived, self.admitted, self.first_token_at, time.perf_counter()),
        )
