"""Incremental detokenisation: byte-level BPE and SentencePiece, multi-byte characters, spaces."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.engine.detokenize import IncrementalDetokenizer

TEXTS = [
    " a big dog",
    "Hello, world! Ünïcödé façade — “quotes” and emoji 🙂🚀 end",
    "日本語のテキストと中文",
    "tabs\tand\nnewlines  double  spaces",
    "x",
]


def stream(tok: object, prompt: str, text: str) -> tuple[list[str], str]:
    prompt_ids = tok(prompt)["input_ids"]
    new_ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.add(i) for i in new_ids]
    pieces.append(detok.flush())
    expected = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)[
        len(tok.decode(prompt_ids, skip_special_tokens=True)) :
    ]
    return pieces, expected


@pytest.fixture(params=["trained-bpe", "gpt2", "stories260k"])
def tokenizer(request: pytest.FixtureRequest, tiny_gpt2_dir: Path) -> object:
    if request.param == "trained-bpe":
        return AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    fixture = "gpt2_tokenizer_dir" if request.param == "gpt2" else "stories260k_dir"
    return AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_decoded_text(tokenizer: object, text: str) -> None:
    pieces, expected = stream(tokenizer, "Once upon a time", text)
    assert "".join(pieces) == expected
    assert all("\ufffd" not in p for p in pieces), pieces


def test_sentencepiece_keeps_leading_space(stories260k_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(stories260k_dir)
    prompt_ids = tok("Once upon a time")["input_ids"]
    new_ids = tok(" a big dog", add_special_tokens=False)["input_ids"]
    assert tok.decode(new_ids).startswith("a")  # the trap: decoding alone drops the space
    detok = IncrementalDetokenizer(tok, prompt_ids)
    assert "".join(detok.add(i) for i in new_ids).startswith(" a")


def test_split_utf8_character_is_held_back(gpt2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    ids = tok("🙂")["input_ids"]
    assert len(ids) > 1  # one character, several byte-level tokens
    detok = IncrementalDetokenizer(tok, tok("Hi ")["input_ids"])
    pieces = [detok.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🙂"
