"""The offline demo model's build: same code path as the tool, written atomically."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from app.finetune.demo import build_demo_model, demo_corpus


def test_demo_corpus_is_prose() -> None:
    corpus = demo_corpus()
    assert len(corpus) > 50
    text = "".join(corpus)
    assert not [line for line in text.splitlines() if line and set(line) == {"*"}], "heading underlines are dropped"
    assert 'The "if" statement is used for conditional execution' in text


@pytest.mark.slow
def test_build_writes_a_complete_model_or_nothing(tmp_path: Path) -> None:
    progress = tmp_path.parent / f"{tmp_path.name}-progress.json"
    output = build_demo_model(tmp_path / "demo", max_steps=2, progress=progress)
    assert json.loads(progress.read_text())["phase"] == "saving"
    assert json.loads(progress.read_text())["step"] == json.loads(progress.read_text())["total_steps"] == 2
    tok = AutoTokenizer.from_pretrained(output)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.bos_token_id == eos
    generation = GenerationConfig.from_pretrained(output)
    assert generation.eos_token_id == generation.bos_token_id == eos
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.model_type == "gpt2" and model.config.n_positions == 256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "no temporary folder is left beside it"

    with pytest.raises(ValidationError):
        build_demo_model(tmp_path / "broken", max_steps=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "a failed build leaves nothing behind"
