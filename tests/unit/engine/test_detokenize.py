"""Tokens rendered in context, over byte-level BPE (GPT-2 and a trained one), SentencePiece with
byte fallback (stories260k, which adds BOS) and a tokenizer with added special tokens: texts join
to the decoded text, bytes join to its UTF-8, candidates render as if chosen."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from app.engine.core.detokenize import TokenRenderer, raw_bytes, render, render_text

TEXTS = [
    " a big dog",
    "Hello, world! Ünïcödé façade — “quotes” and emoji 🙂🚀 end",
    "日本語のテキストと中文",
    "tabs\tand\nnewlines  double  spaces",
    "x",
    "你",
    "hi <|im_end|> there<|im_end|>\n👍🏽 done",
]

ALPHABET = st.sampled_from(
    list("abc xyz.,!\n\t")
    + ["你", "好", "日本", "😀", "👍🏽", "é", " the", " Once", "<|im_end|>", "<|endoftext|>", "<s>"]
)


def _with_added(tok: object) -> object:
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # type: ignore[attr-defined]
    return tok


@pytest.fixture(scope="module", params=["trained-bpe", "gpt2", "stories260k", "gpt2+added"])
def tokenizer(request: pytest.FixtureRequest, tiny_gpt2_dir: Path) -> object:
    if request.param == "trained-bpe":
        return AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    fixture = "stories260k_dir" if request.param == "stories260k" else "gpt2_tokenizer_dir"
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    return _with_added(tok) if request.param.endswith("+added") else tok


def _check(tok: object, ids: list[int]) -> None:
    pieces = render(tok, ids)
    decoded = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # type: ignore[attr-defined]
    assert "".join(p.text for p in pieces) == decoded
    assert b"".join(p.raw for p in pieces) == decoded.encode()
    assert all("\ufffd" not in p.text for p in pieces), [p.text for p in pieces]
    # A candidate renders exactly as the token would if chosen there.
    renderer = TokenRenderer(tok)
    for token_id in ids:
        assert renderer.peek(token_id) == renderer.add(token_id)


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_tokens_tile_the_text(tokenizer: object, text: str) -> None:
    _check(tokenizer, tokenizer(text)["input_ids"])  # type: ignore[operator]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(ALPHABET, min_size=1, max_size=12))
def test_property_texts_and_bytes_tile(tokenizer: object, parts: list[str]) -> None:
    _check(tokenizer, tokenizer("".join(parts))["input_ids"])  # type: ignore[operator]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(ALPHABET, min_size=1, max_size=6), output=st.lists(ALPHABET, min_size=1, max_size=8))
def test_property_generated_tokens_continue_the_prompt(tokenizer: object, prompt: list[str], output: list[str]) -> None:
    prompt_ids = tokenizer("".join(prompt))["input_ids"]  # type: ignore[operator]
    new_ids = tokenizer("".join(output), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    renderer = TokenRenderer(tokenizer, prompt_ids)
    texts = [renderer.add(i, final=k == len(new_ids) - 1).text for k, i in enumerate(new_ids)]
    # Echo is the prompt's rendering followed by the generated tokens' texts.
    assert render_text(tokenizer, prompt_ids) + "".join(texts) == tokenizer.decode(  # type: ignore[attr-defined]
        prompt_ids + new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def test_sentencepiece_keeps_leading_space(stories260k_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(stories260k_dir)
    ids = tok("Once upon a time")["input_ids"]
    assert [p.text for p in render(tok, ids)] == ["", "Once", " upon", " a", " time"]
    new_ids = tok(" a big dog", add_special_tokens=False)["input_ids"]
    assert tok.decode(new_ids).startswith("a")  # the trap: decoding alone drops the space
    renderer = TokenRenderer(tok, ids)
    assert "".join(renderer.add(i).text for i in new_ids).startswith(" a")


def test_split_character_goes_to_the_token_that_completes_it(gpt2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    ids = tok("你")["input_ids"]
    assert len(ids) == 2  # one character, two byte-level tokens
    pieces = render(tok, ids)
    assert [p.text for p in pieces] == ["", "你"]
    assert [p.raw for p in pieces] == [raw_bytes(tok, ids[0]), raw_bytes(tok, ids[1])] == [b"\xe4\xbd", b"\xa0"]


def test_unfinished_character_at_the_end_decodes_as_replacement(gpt2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    first = tok("你")["input_ids"][0]
    renderer = TokenRenderer(tok, tok("Hi")["input_ids"])
    assert renderer.add(first, final=True).text == "\ufffd"
