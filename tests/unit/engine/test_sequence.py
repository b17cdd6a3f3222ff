"""Stop conditions and text bookkeeping of one sequence, driven with real token ids."""

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.load.loader import LoadedModel


def make(lm: LoadedModel, prompt: str, stopping: StoppingParams) -> Sequence:
    tok = lm.tokenizer
    request = GenerationRequest(tok(prompt)["input_ids"], SamplingParams(), stopping, lambda e: None)
    return Sequence(
        request, tok, frozenset([tok.eos_token_id]), frozenset(tok.all_special_ids), 256, torch.device("cpu")
    )


def feed(seq: Sequence, text: str) -> tuple[list[str], list[int]]:
    ids = seq.tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = []
    for i in ids:
        chunks.append(seq.append(i, -1.0, None).text)
        if seq.finished:
            break
    return chunks, ids


def test_stop_string_across_tokens(tiny_lm: LoadedModel) -> None:
    text = " the value of the attribute is returned"
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tiny_lm.tokenizer.decode([i]) for i in ids]
    # A stop string that starts inside one token and ends inside the next.
    stop = pieces[1][-2:] + pieces[2][:2]
    seq = make(tiny_lm, "x", StoppingParams(50, stop=(stop,)))
    chunks, _ = feed(seq, text)
    assert seq.finish_reason == "stop_sequence"
    assert seq.text == text[: text.index(stop)]
    assert "".join(chunks) == seq.text  # held-back text never leaks the stop string


def test_the_stop_string_that_matched_is_reported(tiny_lm: LoadedModel) -> None:
    """Completion.stop_string: the earliest match among several stop strings (Anthropic's
    `stop_sequence`); None when nothing matched."""
    seq = make(tiny_lm, "x", StoppingParams(50, stop=("returned", "of the", "zzz")))
    feed(seq, " the value of the attribute is returned")
    assert seq.finish_reason == "stop_sequence" and seq.completion().stop_string == "of the"
    plain = make(tiny_lm, "x", StoppingParams(3))
    feed(plain, " the value of the attribute")
    assert plain.finish_reason == "length" and plain.completion().stop_string is None


def test_text_is_held_back_while_it_may_become_a_stop(tiny_lm: LoadedModel) -> None:
    seq = make(tiny_lm, "x", StoppingParams(50, stop=("value of the end",)))
    chunks, _ = feed(seq, " the value of the attribute")
    assert seq.finish_reason is None
    assert "".join(chunks) == " the value of the attribute"
    seq2 = make(tiny_lm, "x", StoppingParams(50, stop=("attribute!",)))
    chunks2, _ = feed(seq2, " the value of the attribute")
    assert not "".join(chunks2).endswith("attribute")  # could still become the stop string


def test_eos_and_length(tiny_lm: LoadedModel) -> None:
    eos = tiny_lm.tokenizer.eos_token_id
    seq = make(tiny_lm, "x", StoppingParams(10))
    event = seq.append(eos, -0.1, None)
    assert seq.finish_reason == "eos_token" and event.completion is not None
    assert event.token.special and event.completion.text == ""

    seq = make(tiny_lm, "x", StoppingParams(10, min_new_tokens=2))
    seq.append(eos, -0.1, None)
    assert not seq.finished  # EOS before min_new_tokens does not end it

    seq = make(tiny_lm, "x", StoppingParams(3))
    feed(seq, " the value of the attribute is")
    assert seq.finish_reason == "length" and len(seq.generated) == 3


def _seq(tok: object, stopping: StoppingParams, eos: int) -> Sequence:
    request = GenerationRequest(tok("Hi")["input_ids"], SamplingParams(), stopping, lambda e: None)  # type: ignore[operator]
    specials = frozenset(tok.all_special_ids)  # type: ignore[attr-defined]
    return Sequence(request, tok, frozenset([eos]), specials, 256, torch.device("cpu"))  # type: ignore[arg-type]


def _run(seq: Sequence, ids: list[int]) -> tuple[list[str], list[str]]:
    """Feed ids; return the event texts and the texts of the tokens released with them."""
    chunks, released = [], []
    for i in ids:
        event = seq.append(i, -1.0, None)
        assert event.text == "".join(t.text for t in event.tokens)  # a chunk's text is its tokens' texts
        chunks.append(event.text)
        released += [t.text for t in event.tokens]
        if seq.finished:
            break
    return chunks, released


def test_stop_string_matches_special_token_text(gpt2_tokenizer_dir: Path) -> None:
    """Class 4: `<|im_end|>` is an added special token that is not EOS."""
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    ids = tok("Hello there<|im_end|> more text", add_special_tokens=False)["input_ids"]
    for include in (False, True):
        seq = _seq(tok, StoppingParams(50, stop=("<|im_end|>",), include_stop=include), tok.eos_token_id)
        chunks, released = _run(seq, ids)
        assert seq.finish_reason == "stop_sequence"
        # The returned text keeps today's rule: special tokens' text is not in it.
        assert seq.text == "Hello there" == "".join(chunks) == "".join(released)
        assert [t.text for t in seq.tokens] == released


def test_stop_kept_on_tgi_and_cut_on_openai(gpt2_tokenizer_dir: Path) -> None:
    """Class 5: TGI keeps the stop sequence, OpenAI cuts before it; token texts are cut alike."""
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    ids = tok(" a girl named Lily who liked", add_special_tokens=False)["input_ids"]
    for include, expected in ((True, " a girl named Lil"), (False, " a girl named ")):
        seq = _seq(tok, StoppingParams(50, stop=("Lil",), include_stop=include), tok.eos_token_id)
        chunks, released = _run(seq, ids)
        assert seq.finish_reason == "stop_sequence"
        assert seq.text == expected == "".join(chunks) == "".join(released) == "".join(t.text for t in seq.tokens)


def test_stop_token_ids_and_ignore_eos(gpt2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    ids = tok(" one two three four", add_special_tokens=False)["input_ids"]
    seq = _seq(tok, StoppingParams(50, stop_token_ids=(ids[2],)), tok.eos_token_id)
    _run(seq, ids)
    assert seq.finish_reason == "stop_sequence" and seq.text == " one two three"  # vLLM keeps a non-special one
    seq = _seq(tok, StoppingParams(3, ignore_eos=True), tok.eos_token_id)
    _run(seq, [tok.eos_token_id, *ids])
    assert seq.finish_reason == "length" and len(seq.generated) == 3


PARTS = st.sampled_from([" the", " Lily", "你", "好", "😀", "é", "\n", "!", "<|im_end|>", " big dog", "ab"])


@pytest.fixture(scope="module", params=["gpt2", "stories260k"])
def family(request: pytest.FixtureRequest) -> object:
    tok = AutoTokenizer.from_pretrained(
        request.getfixturevalue(f"{request.param.replace('gpt2', 'gpt2_tokenizer')}_dir")
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    return tok


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(PARTS, min_size=1, max_size=10), data=st.data(), include=st.booleans())
def test_property_stops_keep_tokens_and_text_in_step(
    family: object, parts: list[str], data: st.DataObject, include: bool
) -> None:
    tok = family
    ids = tok("".join(parts), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    # The length limit ends both at the last id, so text held back as a possible stop is released.
    plain = _seq(tok, StoppingParams(len(ids)), -1)
    _run(plain, ids)
    stop = data.draw(st.sampled_from(["<|im_end|>", "Lily", "好😀", " big", "zz"]))
    seq = _seq(tok, StoppingParams(len(ids), stop=(stop,), include_stop=include), -1)
    chunks, released = _run(seq, ids)
    # Streamed chunks, released tokens and the final tokens all join to the returned text.
    assert "".join(chunks) == "".join(released) == "".join(t.text for t in seq.tokens) == seq.text
    assert plain.text.startswith(seq.text)
    if seq.finish_reason == "stop_sequence" and "<" not in stop:
        assert seq.text.endswith(stop) if include else stop not in seq.text
    if stop not in "".join(parts):
        assert seq.text == plain.text
