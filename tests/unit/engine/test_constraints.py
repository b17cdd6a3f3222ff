"""Structured output in the engine, on a random tiny GPT-2 (byte-level BPE) and on stories260k
(SentencePiece): the output fits the grammar although the model is nonsense, a constrained row
does not change its batch neighbours (nor they it), and a grammar failure fails only its request."""

import dataclasses
import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import torch

from app.engine.core.constraints import GrammarCompiler, GrammarError, GrammarSpec
from app.engine.core.types import Completion, Event, GenerationRequest, SamplingParams, StoppingParams
from app.engine.engine import Engine
from app.engine.load.loader import LoadedModel, load_model
from tests.unit.engine.test_engine import make_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


def compiler(lm: LoadedModel) -> GrammarCompiler:
    return GrammarCompiler(lm.tokenizer, lm.model.config.vocab_size, [lm.tokenizer.eos_token_id])


def run(engine: Engine, requests: list[GenerationRequest]) -> list[Completion]:
    done: dict[int, Completion] = {}
    finished = threading.Event()

    def make(i: int, r: GenerationRequest) -> GenerationRequest:
        def on_event(event: Event) -> None:
            if event.completion is not None:
                done[i] = event.completion
                if len(done) == len(requests):
                    finished.set()

        return GenerationRequest(r.prompt_ids, r.sampling, r.stopping, on_event, grammar=r.grammar)

    for i, r in enumerate(requests):
        engine.submit(make(i, r))
    assert finished.wait(60), "requests did not finish"
    return [done[i] for i in range(len(requests))]


def req(lm: LoadedModel, text: str, grammar=None, n: int = 60, **sampling) -> GenerationRequest:
    ids = lm.tokenizer(text)["input_ids"]
    return GenerationRequest(ids, SamplingParams(**sampling), StoppingParams(n), lambda e: None, grammar=grammar)


@pytest.fixture(scope="module", params=["compact", "transformers"])
def engine(request: pytest.FixtureRequest, tiny_lm: LoadedModel):
    """The engine on each runner (the same tiny GPT-2 on its compact forward and on transformers')."""
    e = make_engine(tiny_lm if request.param == "compact" else dataclasses.replace(tiny_lm, compact=None))
    yield e
    e.stop()


def test_json_schema_holds_for_greedy_and_sampled_rows(tiny_lm: LoadedModel, engine: Engine) -> None:
    grammar = compiler(tiny_lm).compile(GrammarSpec.json_schema(SCHEMA))
    requests = [req(tiny_lm, "the import", grammar, 80)]
    requests += [req(tiny_lm, "lists are", grammar, 80, do_sample=True, seed=s, temperature=1.5) for s in range(4)]
    for c in run(engine, requests):
        assert c.finish_reason == "eos_token", c
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_regex_choice_and_lark(tiny_lm: LoadedModel, engine: Engine) -> None:
    comp = compiler(tiny_lm)
    regex = comp.compile(GrammarSpec("regex", r"[0-9]{3}-[a-z]{2}"))
    choice = comp.compile(GrammarSpec.choice(["yes", "no", "don't know"]))
    lark = comp.compile(GrammarSpec("lark", 'start: "(" item ("," item)* ")"\nitem: /[xy]/'))
    results = run(
        engine,
        [req(tiny_lm, "the", regex), req(tiny_lm, "the", choice, do_sample=True, seed=3), req(tiny_lm, "a", lark)],
    )
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", results[0].text), results[0].text
    assert results[1].text in ("yes", "no", "don't know")
    assert re.fullmatch(r"\([xy](,[xy])*\)", results[2].text) or results[2].finish_reason == "length"
    assert all(r.finish_reason in ("eos_token", "length") for r in results)


def test_constrained_and_free_rows_share_a_batch_unchanged(tiny_lm: LoadedModel, engine: Engine) -> None:
    grammar = compiler(tiny_lm).compile(GrammarSpec.json_schema(SCHEMA))
    free = req(tiny_lm, "the import statement", None, 30)
    constrained = req(tiny_lm, "lists are mutable", grammar, 80, do_sample=True, seed=7)
    alone = [run(engine, [free])[0].text, run(engine, [constrained])[0].text]
    together = [c.text for c in run(engine, [free, constrained])]
    assert together == alone


def test_grammar_failure_fails_only_its_request(tiny_lm: LoadedModel, engine: Engine) -> None:
    # A matcher in its error state (fed a token its grammar rejects) fails when asked for a mask.
    grammar = compiler(tiny_lm).compile(GrammarSpec("regex", "[0-9]+"))

    class Broken:
        spec = grammar.spec

        def matcher(self):
            m = grammar.matcher()
            m._m.consume_token(tiny_lm.tokenizer("zzz")["input_ids"][0])  # puts it in its error state
            return m

    bad = req(tiny_lm, "the", Broken())
    good = req(tiny_lm, "the import statement", None, 10)
    bad_result, good_result = run(engine, [bad, good])
    assert bad_result.finish_reason == "error" and "structured output failed" in (bad_result.error or "")
    assert good_result.finish_reason == "length" and good_result.generated_tokens == 10


def test_invalid_grammars_say_what_is_wrong(tiny_lm: LoadedModel) -> None:
    comp = compiler(tiny_lm)
    for spec, words in [
        (GrammarSpec("regex", "[0-9"), "unclosed character class"),
        (GrammarSpec("lark", "start: foo"), "unknown name"),
        (GrammarSpec.json_schema({"type": "nonsense"}), "nonsense"),
        (GrammarSpec("json", "{x"), "not valid JSON"),
        (GrammarSpec.choice([]), "non-empty"),
    ]:
        with pytest.raises(GrammarError, match=words):
            comp.compile(spec)


def test_mask_keeps_special_tokens_out_and_eos_for_the_end(tiny_lm: LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    vocab = tiny_lm.model.config.vocab_size
    matcher = compiler(tiny_lm).compile(GrammarSpec.choice(["yes"])).matcher()
    allowed = matcher.allowed(vocab, torch.device("cpu"))
    assert allowed.shape == (vocab,) and allowed.any()
    assert not allowed[tok.all_special_ids].any()  # EOS included: "yes" is not written yet
    for token in tok("yes", add_special_tokens=False)["input_ids"]:
        matcher.advance(token)
    assert matcher.complete
    assert matcher.allowed(vocab, torch.device("cpu")).nonzero().flatten().tolist() == [tok.eos_token_id]
    with pytest.raises(GrammarError, match="structured output failed: parser stopped"):
        matcher.advance(tok("no", add_special_tokens=False)["input_ids"][0])


def test_cache_returns_the_compiled_grammar(tiny_lm: LoadedModel) -> None:
    seen: list[float] = []
    comp = GrammarCompiler(tiny_lm.tokenizer, tiny_lm.model.config.vocab_size, [0], on_compile=seen.append)
    a = comp.compile(GrammarSpec.json_schema(SCHEMA))
    b = comp.compile(GrammarSpec.json_schema(json.loads(json.dumps(SCHEMA))))
    assert a is b and len(seen) == 1


def test_sentencepiece_model_keeps_to_the_grammar(stories260k_dir: Path) -> None:
    lm = load_model(str(stories260k_dir))
    eos = [lm.tokenizer.eos_token_id]
    comp = GrammarCompiler(lm.tokenizer, lm.model.config.vocab_size, eos)
    schema = {
        "type": "object",
        "properties": {"who": {"enum": ["Lily", "Tom"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    }
    schema |= {"required": ["who", "n"], "additionalProperties": False}
    json_grammar = comp.compile(GrammarSpec.json_schema(schema))
    regex_grammar = comp.compile(GrammarSpec("regex", r"Once upon a [a-z]+ day\."))
    e = make_engine(lm)
    try:
        results = run(
            e,
            [
                req(lm, "Once upon a time", json_grammar, 60, do_sample=True, seed=1),
                req(lm, "Lily", regex_grammar, 60),
            ],
        )
    finally:
        e.stop()
    jsonschema.validate(json.loads(results[0].text), schema)
    assert re.fullmatch(r"Once upon a [a-z]+ day\.", results[1].text) or results[1].finish_reason == "length"


def _walk(grammar, tok, text: str) -> bool:  # noqa: ANN001
    """Whether `text` (its own tokens) is a whole document of the compiled grammar."""
    matcher = grammar.matcher()
    try:
        for token in tok(text, add_special_tokens=False)["input_ids"]:
            matcher.advance(token)
    except GrammarError:
        return False
    return matcher._m.is_accepting()


def test_property_order_is_the_schema_order(tiny_lm: LoadedModel) -> None:
    """No sort_keys: `reasoning` before `answer` as the schema says (the spec text keeps it)."""
    schema = {
        "type": "object",
        "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
        "required": ["reasoning", "answer"],
    }
    spec = GrammarSpec.json_schema(schema)
    assert list(json.loads(spec.source)["properties"]) == ["reasoning", "answer"]
    grammar = compiler(tiny_lm).compile(spec)
    assert _walk(grammar, tiny_lm.tokenizer, '{"reasoning": "x", "answer": 1}')
    assert not _walk(grammar, tiny_lm.tokenizer, '{"answer": 1, "reasoning": "x"}')


def test_unspecified_additional_properties_default_false_and_the_setting(tiny_lm: LoadedModel) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    extra = '{"city": "a", "more": 1}'
    closed = compiler(tiny_lm).compile(GrammarSpec.json_schema(schema))
    assert _walk(closed, tiny_lm.tokenizer, '{"city": "a"}') and not _walk(closed, tiny_lm.tokenizer, extra)
    lm = tiny_lm
    open_compiler = GrammarCompiler(
        lm.tokenizer, lm.model.config.vocab_size, [lm.tokenizer.eos_token_id], additional_properties=True
    )
    assert _walk(open_compiler.compile(GrammarSpec.json_schema(schema)), lm.tokenizer, extra)
    # A schema that says so itself is obeyed either way.
    said = compiler(tiny_lm).compile(GrammarSpec.json_schema(schema | {"additionalProperties": True}))
    assert _walk(said, tiny_lm.tokenizer, extra)
    # An object schema without properties (JSON mode) means any object.
    any_object = compiler(tiny_lm).compile(GrammarSpec.json_schema({"type": "object"}))
    assert _walk(any_object, tiny_lm.tokenizer, extra)


def test_closed_objects_reaches_nested_schemas_but_not_all_of_branches() -> None:
    from app.engine.core.constraints import closed_objects

    obj = {"type": "object", "properties": {"a": {"type": "string"}}}
    schema = {
        "type": "object",
        "properties": {"inner": obj, "list": {"type": "array", "items": obj}},
        "$defs": {"d": obj},
        "anyOf": [obj],
        "allOf": [obj],
    }
    out = closed_objects(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["inner"]["additionalProperties"] is False
    assert out["properties"]["list"]["items"]["additionalProperties"] is False
    assert out["$defs"]["d"]["additionalProperties"] is False and out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in out["allOf"][0]
    assert "additionalProperties" not in obj  # the request's schema is not changed
    assert closed_objects({"type": "object", "unevaluatedProperties": True}) == {
        "type": "object",
        "unevaluatedProperties": True,
    }


def test_accepts_tells_a_whole_document_from_a_cut_one(tiny_lm: LoadedModel) -> None:
    grammar = compiler(tiny_lm).compile(GrammarSpec.json_schema({"type": "object", "properties": {"c": {}}}))
    assert grammar.accepts('{"c": "你好"}')
    assert not grammar.accepts('{"c": "你好')
    assert not grammar.accepts('{"c": "你好"} trailing')
    assert not grammar.accepts("")
