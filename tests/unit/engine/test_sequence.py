"""Stop conditions and text bookkeeping of one sequence, driven with real token ids."""

import torch

from app.engine.loader import LoadedModel
from app.engine.sequence import Sequence
from app.engine.types import GenerationRequest, SamplingParams, StoppingParams


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
