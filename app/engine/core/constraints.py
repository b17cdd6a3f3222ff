"""Structured output: grammars that constrain a sequence's tokens, enforced with llguidance.

A `GrammarSpec` (JSON schema, regex, choice list or Lark grammar) is compiled by a
`GrammarCompiler` into a `Grammar` once, off the engine thread (the API's worker thread), and
cached by its text (LRU). Each constrained sequence gets its own `Matcher` from it: before
sampling, `mask_row` sets the logits of every token the grammar forbids to -inf; after sampling,
`advance` feeds it the chosen token. llguidance never raises on user errors; it enters an error
state, which we turn into `GrammarError` (at compile time: a 4xx; while decoding: that request fails
alone). Sources: llguidance's Python API (llguidance/_lib.pyi) and its JSON schema support docs.
"""

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

if TYPE_CHECKING:  # annotations only (JsonCompileOptions exists only in the stub)
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerFast

GrammarKind = Literal["json", "regex", "choice", "lark"]

# Compact separators: a model cannot stall on whitespace between JSON items (OpenAI's and vLLM's
# outputs look the same), and every valid document still parses with any JSON reader.
_JSON_OPTIONS: "JsonCompileOptions" = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
CACHE_SIZE = 256  # compiled grammars kept; a hit skips the compile (bench: ~1 ms for 10 fields)


class GrammarError(ValueError):
    """The grammar is invalid, too large, or the matcher rejected a token; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asks for. `source` is the JSON schema text, the regex, the choices as a JSON
    list, or the Lark grammar; equal specs share one compiled grammar."""

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> "GrammarSpec":
        # Never sort_keys: the schema's property order is the order the output must follow.
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json", text)

    @classmethod
    def choice(cls, choices: list[str]) -> "GrammarSpec":
        return cls("choice", json.dumps(choices))

    def grammar_text(self, additional_properties: bool = False) -> str:
        """The llguidance grammar for this spec. `additional_properties` is what an object schema
        that lists `properties` but says nothing of `additionalProperties` allows (false: no other
        keys, as vLLM's default backend and OpenAI's strict mode; true: JSON Schema's default).
        Raises GrammarError for malformed input."""
        if self.kind == "json":
            try:
                schema = json.loads(self.source)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise GrammarError("the JSON schema must be an object (or true/false)")
            if not additional_properties:
                try:
                    schema = closed_objects(schema)
                except RecursionError:  # llguidance refuses such depth anyway: say so, not a 500
                    raise GrammarError("the JSON schema is nested too deeply") from None
            try:
                # llguidance takes true/false schemas too; its stub lists only dict and str.
                json_schema = cast(dict[str, Any], schema)
                return llguidance.LLMatcher.grammar_from_json_schema(json_schema, defaults=_JSON_OPTIONS)
            except ValueError as exc:
                raise GrammarError(f"invalid JSON schema: {exc}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise GrammarError("choices must be a non-empty list of non-empty strings")
            # Lark string literals take JSON's escapes, so any choice text is quoted exactly.
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        return llguidance.LLMatcher.grammar_from_lark(self.source)


# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames")
_LIST = ("anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of `schema` where every object schema that lists `properties` (or
    `patternProperties`) without `additionalProperties`/`unevaluatedProperties` gets
    `additionalProperties: false`. An object schema with no properties (`{"type": "object"}`,
    JSON mode) stays open: it means any object. Branches of `allOf` stay open too, since each
    closed branch would forbid the other branches' keys."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict | list):
            out[key] = closed_objects(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed_objects(s, in_all_of=True) for s in out["allOf"]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    lists_keys = "properties" in out or "patternProperties" in out
    if lists_keys and not in_all_of and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


class Grammar:
    """A compiled grammar: a template matcher, copied for each sequence."""

    def __init__(
        self, spec: GrammarSpec, template: llguidance.LLMatcher, compile_s: float, tokenizer: llguidance.LLTokenizer
    ) -> None:
        self.spec = spec
        self._template = template
        self._tokenizer = tokenizer
        self.compile_s = compile_s

    def matcher(self) -> "Matcher":
        return Matcher(self._template.deep_copy())

    def accepts(self, text: str) -> bool:
        """Whether `text` is a whole document of this grammar (not a prefix of one). Used when a
        stop string cut constrained output: the cut text is then checked, not the tokens the
        matcher saw (which include the stop string). Cost: tokenizing `text`, one matcher step
        per token."""
        matcher = self._template.deep_copy()
        return matcher.consume_tokens(self._tokenizer.tokenize_str(text)) and matcher.is_accepting()


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def _check(self) -> None:
        if self._m.is_error():  # the first line says why; the rest is a parser state dump
            raise GrammarError(f"structured output failed: {self._m.get_error().splitlines()[0]}")

    def allowed(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next (EOS only once it may end)."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        self._check()
        allowed = np.unpackbits(bits, bitorder="little")[:vocab].astype(bool)
        if allowed.shape[0] < vocab:  # logits wider than the tokenizer: the padding is never allowed
            allowed = np.pad(allowed, (0, vocab - allowed.shape[0]))
        return torch.from_numpy(allowed).to(device)

    def advance(self, token_id: int) -> None:
        """Feed the chosen token. Raises GrammarError if the grammar rejects it."""
        if not self._m.consume_token(token_id):
            self._check()
            raise GrammarError(f"structured output failed: the grammar rejected token {token_id}")

    @property
    def complete(self) -> bool:
        """True when nothing more can follow (the sequence ends as if EOS were sampled)."""
        return self._m.is_stopped()


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe; call it off the engine thread.

    The llguidance tokenizer (~0.8 s for GPT-2's 50k tokens) is built once, in the background from
    `warm()` or on first use."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_ids: list[int],
        on_compile: Callable[[float], None] | None = None,
        additional_properties: bool = False,
    ) -> None:
        """`additional_properties`: TEXTGEN_JSON_ADDITIONAL_PROPERTIES (see GrammarSpec.grammar_text)."""
        self._on_compile = on_compile
        self._additional_properties = additional_properties
        self._hf = tokenizer
        self._vocab = max(vocab_size, len(tokenizer))
        self._eos = eos_ids
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()

    def warm(self) -> None:
        threading.Thread(target=self._tokenizer, name="textgen-grammar-warm", daemon=True).start()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                fast = cast("PreTrainedTokenizerFast", self._hf)  # from_tokenizer checks this itself
                self._lltok = llguidance.hf.from_tokenizer(fast, n_vocab=self._vocab, eos_token=self._eos or None)
            return self._lltok

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar for `spec` (cached). Raises GrammarError saying what is wrong."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        tokenizer = self._tokenizer()
        start = time.perf_counter()
        text = spec.grammar_text(self._additional_properties)
        template = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        template.compute_bitmask()  # builds the lexer now, not in the engine's first step
        if template.is_error():
            raise GrammarError(template.get_error())
        grammar = Grammar(spec, template, time.perf_counter() - start, tokenizer)
        if self._on_compile is not None:
            self._on_compile(grammar.compile_s)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar
