"""One request's decoding state: generated tokens rendered in context, stop conditions, and its
random generator.

Stop strings are matched against the output with special tokens' own text kept (`<|im_end|>`),
while the returned text drops special tokens. On a match the output is cut before the stop string
(OpenAI) or after it (TGI, `include_stop`); token texts are cut the same way, so the tokens'
texts always join to the returned text. Without `include_stop`, tokens are released to the caller
only once their text can no longer become part of a stop string.
"""

import secrets
import time

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from app.engine.core.detokenize import TokenRenderer, special_text
from app.engine.core.types import AdapterRef, Completion, Event, FinishReason, GenerationRequest, Timeline, Token


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        special_ids: frozenset[int],
        max_total_tokens: int,
        device: torch.device,
        adapter: AdapterRef | None = None,
    ) -> None:
        self.request = request
        self.adapter = adapter  # held from submit until the engine retires the sequence
        self.tokenizer = tokenizer
        stopping = request.stopping
        self.eos_ids = frozenset() if stopping.ignore_eos else eos_ids
        self.stop_ids = self.eos_ids | frozenset(stopping.stop_token_ids)
        self.special_ids = special_ids
        self.max_total_tokens = max_total_tokens
        self.arrived = time.perf_counter()
        self.admitted = 0.0
        self.cached_tokens = 0  # prompt tokens whose K/V came from the prefix cache at its prefill
        self.cacheable_tokens = 0  # what the prefix cache held of its prompt when last looked up
        self.prefix_keys: list[bytes] | None = None  # its prompt's prefix-cache keys, once looked up
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.generated: list[int] = []
        self.tokens: list[Token] = []
        self.prefill: list[Token] | None = None
        self.text = ""
        self.released = 0  # self.tokens[:released] have been handed to the caller
        self.finish_reason: FinishReason | None = None
        self.stop_string: str | None = None  # the stop string that ended it (Anthropic's stop_sequence)
        self.matcher = request.grammar.matcher() if request.grammar is not None else None
        self.renderer = TokenRenderer(tokenizer, request.prompt_ids)
        # Stops are matched in `_match`: the output with special tokens' text kept. Per token:
        # where its text starts in `_match` and in `text`, and whether it is special.
        self._match = ""
        self._spans: list[tuple[int, int, bool]] = []
        sampling = request.sampling
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if sampling.do_sample:
            self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        # The stop string that may straddle the newest text is never longer than this.
        self._stop_window = max((len(s) for s in stopping.stop), default=0)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefill_len(self) -> int:
        """Prompt tokens its prefill runs: those not in the prefix cache."""
        return self.prompt_len - self.cacheable_tokens

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_len + self.request.stopping.max_new_tokens

    @property
    def eos_allowed(self) -> bool:
        return len(self.generated) >= self.request.stopping.min_new_tokens

    @property
    def suppressed_ids(self) -> list[int]:
        """Ids that must not be chosen now: EOS and stop token ids before `min_new_tokens`."""
        return [] if self.eos_allowed else sorted(self.stop_ids)

    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.generated

    def _candidates(self, renderer: TokenRenderer, top: list[tuple[int, float]] | None) -> list[Token] | None:
        if top is None:
            return None
        out = []
        for i, lp in top:
            piece = renderer.peek(i)
            out.append(Token(i, piece.text, lp, i in self.special_ids, None, piece.raw))
        return out

    def set_prefill(self, logprobs: list[float], top: list[list[tuple[int, float]]] | None) -> None:
        """Render the prompt tokens: `logprobs[i]` and `top[i]` belong to prompt token i + 1
        (the first token has no logprob: NaN)."""
        ids = self.request.prompt_ids
        renderer = TokenRenderer(self.tokenizer)
        tokens = []
        for pos, token_id in enumerate(ids):
            candidates = None if pos == 0 or top is None else self._candidates(renderer, top[pos - 1])
            piece = renderer.add(token_id)
            lp = float("nan") if pos == 0 else logprobs[pos - 1]
            tokens.append(Token(token_id, piece.text, lp, token_id in self.special_ids, candidates, piece.raw))
        self.prefill = tokens

    def append(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> Event:
        """Record one sampled token, update the text and stop state, and build its event."""
        if self.matcher is not None:
            self.matcher.advance(token_id)  # raises GrammarError first: nothing recorded then
        if not self.generated:
            self.first_token_at = time.perf_counter()
        self.generated.append(token_id)
        stopping = self.request.stopping
        if token_id in self.stop_ids and self.eos_allowed:
            self.finish_reason = "eos_token" if token_id in self.eos_ids else "stop_sequence"
        elif self.matcher is not None and self.matcher.complete:
            self.finish_reason = "eos_token"  # nothing may follow: as if EOS were sampled
        elif (
            len(self.generated) >= stopping.max_new_tokens
            or self.prompt_len + len(self.generated) >= self.max_total_tokens
        ):
            self.finish_reason = "length"
        candidates = self._candidates(self.renderer, top)
        piece = self.renderer.add(token_id, final=self.finished)
        special = token_id in self.special_ids
        token = Token(token_id, piece.text, logprob, special, candidates, piece.raw)
        self.tokens.append(token)
        self._spans.append((len(self._match), len(self.text), piece.special))
        self._match += special_text(self.tokenizer, token_id) if piece.special else piece.text
        self.text += piece.text
        self._check_stop()
        first = len(self.tokens) == 1
        released = self._release()
        return Event(
            token,
            "".join(t.text for t in released),
            self.completion() if self.finished else None,
            released,
            self.prefill if first else None,
        )

    def _check_stop(self) -> None:
        stops = self.request.stopping.stop
        if not stops or self.finish_reason == "stop_sequence":
            return
        start = max(0, self._spans[-1][0] - self._stop_window + 1)
        hits = [(p, p + len(s)) for s in stops if (p := self._match.find(s, start)) >= 0]
        if not hits:
            return
        begin, end = min(hits)
        self.stop_string = self._match[begin:end]
        self._cut(end if self.request.stopping.include_stop else begin)
        self.finish_reason = "stop_sequence"

    def _cut(self, match_pos: int) -> None:
        """Cut the returned text (and the token texts) where `match_pos` of `_match` falls."""
        cut = len(self.text)
        for k in range(len(self.tokens) - 1, -1, -1):
            m_start, t_start, special = self._spans[k]
            if m_start < match_pos:
                cut = t_start if special else t_start + (match_pos - m_start)
                break
            cut = t_start
        for k in range(len(self.tokens)):
            t_start = self._spans[k][1]
            token = self.tokens[k]
            keep = max(0, min(len(token.text), cut - t_start))
            if keep < len(token.text):
                token.text = token.text[:keep]
                token.raw = token.text.encode()
        self.text = self.text[:cut]

    def _hold_from(self) -> int:
        """Where in `_match` a stop string could still begin (len(_match) when nowhere)."""
        end = len(self._match)
        if self.finished or self.request.stopping.include_stop:
            return end
        hold = end
        for stop in self.request.stopping.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if self._match.endswith(stop[:k]):
                    hold = min(hold, end - k)
                    break
        return hold

    def _release(self) -> list[Token]:
        """Tokens whose text is now final, in order."""
        hold = self._hold_from()
        start = self.released
        while self.released < len(self.tokens):
            m_start = self._spans[self.released][0]
            token = self.tokens[self.released]
            m_len = len(special_text(self.tokenizer, token.id)) if token.special else len(token.text)
            if m_start + m_len > hold:
                break
            self.released += 1
        return self.tokens[start : self.released]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self, error: str | None = None) -> Completion:
        return Completion(
            text=self.text,
            finish_reason=self.finish_reason or "error",
            generated_tokens=len(self.generated),
            prompt_tokens=self.prompt_len,
            cached_tokens=self.cached_tokens,
            seed=self.seed,
            tokens=self.tokens,
            prefill=self.prefill,
            error=error,
            stop_string=self.stop_string,
            queue_time=max(0.0, self.admitted - self.arrived),
            timeline=Timeline(self.arrived, self.admitted, self.first_token_at, time.perf_counter()),
        )
