"""The neutral decisions modules: normalisation, calibration maths, the prompt's option ids, and the
fine-tune loop's data errors (file and line named)."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.decisions.calibration import (
    T_MAX,
    bound_advice,
    expected_calibration_error,
    fit_temperature,
    nll,
    read_temperature,
    recorded_template_hash,
    template_hash,
    write_calibration,
)
from app.decisions.prompt import completion_prompt, encode
from app.decisions.questions import DecisionInputError, parse_question
from app.decisions.score import answer, normalise
from app.finetune.data import DataError
from app.finetune.decisions import read_examples

CHOICE = {"type": "choice", "instructions": "Pick", "choices": [{"value": "true"}, {"value": True}, {"value": "x"}]}


def test_normalise_is_a_softmax_of_the_sums_over_the_temperature() -> None:
    p = normalise([-1.0, -2.0, -3.5], 2.0)
    weights = [math.exp(-0.5), math.exp(-1.0), math.exp(-1.75)]
    assert p == pytest.approx([w / sum(weights) for w in weights], rel=1e-12)
    assert abs(math.fsum(normalise([-1e4, -1e4 + 1, 0.0])) - 1) < 1e-12


def test_a_string_and_a_boolean_with_the_same_text_are_two_options() -> None:
    q = parse_question(CHOICE, "questions.0", 8)
    assert [o.text for o in q.options] == ['"true"', "true", '"x"']
    assert q.option_for(True) == 1 and q.option_for("true") == 0
    a = answer(q, [0.2, 0.5, 0.3])
    assert a["choice"] is True and a["confidence"] == 0.5
    with pytest.raises(DecisionInputError) as info:
        parse_question({**CHOICE, "choices": [{"value": True}, {"value": True}]}, "questions.3", 8)
    assert info.value.param == "questions.3.choices.1.value"


def test_score_is_the_weighted_mean_of_level_indices() -> None:
    q = parse_question({"type": "score", "instructions": "How?", "levels": [{"label": "a"}, {"label": "b"}]}, "q", 8)
    assert answer(q, [0.25, 0.75])["score"] == 0.75


def test_the_fitted_temperature_lowers_the_held_out_nll() -> None:
    # Overconfident sums: right 60% of the time with ~99% confidence.
    sums = [[0.0, -5.0] if i % 5 < 3 else [-5.0, 0.0] for i in range(50)]
    labels = [0] * 50
    t = fit_temperature(sums, labels)
    assert t > 1 and nll(sums, labels, t) < nll(sums, labels, 1.0)
    assert expected_calibration_error(sums, labels, t) < expected_calibration_error(sums, labels, 1.0)


def test_a_temperature_at_the_search_bound_comes_with_advice() -> None:
    # Confidently wrong half the time: the best temperature lies beyond the bound.
    sums = [[0.0, -40.0] if i % 2 else [-40.0, 0.0] for i in range(40)]
    labels = [0] * 40
    t = fit_temperature(sums, labels)
    assert t == pytest.approx(T_MAX, rel=1e-3)
    advice = bound_advice(t)
    assert advice is not None and "more data" in advice and "--max-steps" in advice
    assert (
        bound_advice(fit_temperature([[0.0, -5.0] if i % 5 < 3 else [-5.0, 0.0] for i in range(50)], [0] * 50)) is None
    )


def test_decisions_json_records_the_template_hash(tmp_path: Path) -> None:
    assert recorded_template_hash(tmp_path) == (False, None)  # no file: nothing recorded
    write_calibration(tmp_path, 1.5, {}, "{{ messages }}")
    assert recorded_template_hash(tmp_path) == (True, template_hash("{{ messages }}"))
    write_calibration(tmp_path, 1.5, {}, None)
    assert recorded_template_hash(tmp_path) == (True, None)  # completion style, recorded as null
    (tmp_path / "decisions.json").write_text(json.dumps({"temperature": 2.0}))  # an older adapter
    assert recorded_template_hash(tmp_path) == (False, None) and read_temperature(tmp_path) == 2.0


def test_read_temperature_defaults_and_refuses_nonsense(tmp_path: Path) -> None:
    assert read_temperature(tmp_path) == 1.0
    (tmp_path / "decisions.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="positive"):
        read_temperature(tmp_path)


def test_option_ids_are_the_in_context_tokens_after_the_prompt(gpt2_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    q = parse_question({**CHOICE, "choices": [{"value": "billing"}, {"value": "shipping"}]}, "q", 8)
    e = encode(tok, None, "My parcel", q)
    text = completion_prompt("My parcel", q)
    assert tok.decode(e.prompt) == text
    assert [tok.decode(o) for o in e.options] == [" billing\n", " shipping\n"]
    assert all(tok(text + tok.decode(o))["input_ids"] == e.prompt + o for o in e.options)


def test_finetune_data_errors_name_the_file_and_line(gpt2_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    good = {"input": "hi", "question": CHOICE, "answer": True}
    path = tmp_path / "d.jsonl"
    for bad, message in [
        ({**good, "answer": "false"}, "answer"),
        ({**good, "question": {"type": "rank", "instructions": "x"}}, "question.type"),
        ({"input": "hi", "question": CHOICE}, "exactly"),
    ]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=f"d.jsonl:2: .*{message}"):
            read_examples(str(path), tok, None)
