"""EOS ends a generation (finish_reason eos_token) unless min_new_tokens holds it off. The tiny
model's EOS embedding is scaled up (GPT-2 ties it to the output layer) so EOS actually wins."""

from collections.abc import Iterator

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import build_tiny_gpt2
from tests.e2e.server import run_server


@pytest.fixture(scope="module")
def eos_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = build_tiny_gpt2(tmp_path_factory.mktemp("eos-gpt2"))
    model = AutoModelForCausalLM.from_pretrained(path)
    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    with torch.no_grad():
        model.transformer.wte.weight[eos] *= 6
    model.save_pretrained(path)
    with run_server(path) as url:
        yield url


def test_eos_finishes_and_min_new_tokens_holds_it_off(eos_url: str) -> None:
    prompts = ["The list", "A function", "Import", "x", "class", "The with statement", "Objects", "while"]
    ended = None
    for prompt in prompts:
        out = httpx.post(
            f"{eos_url}/generate",
            json={"inputs": prompt, "parameters": {"max_new_tokens": 30, "details": True}},
            timeout=60,
        ).json()
        if out["details"]["finish_reason"] == "eos_token":
            ended = (prompt, out)
            break
    assert ended is not None, "no prompt ended with EOS"
    prompt, out = ended
    last = out["details"]["tokens"][-1]
    # A special token adds nothing to the text, so its text is "" (docs/api.md, "Token texts").
    assert last["special"] is True and last["text"] == ""
    assert "<|endoftext|>" not in out["generated_text"]
    assert "".join(t["text"] for t in out["details"]["tokens"]) == out["generated_text"]
    assert out["details"]["generated_tokens"] < 30
    held = httpx.post(
        f"{eos_url}/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 30, "min_new_tokens": 30, "details": True}},
        timeout=60,
    ).json()
    assert held["details"]["finish_reason"] == "length" and held["details"]["generated_tokens"] == 30
    openai = httpx.post(
        f"{eos_url}/v1/completions",
        json={
            "model": httpx.get(f"{eos_url}/v1/models").json()["data"][0]["id"],
            "prompt": prompt,
            "max_tokens": 30,
            "temperature": 0,
        },
        timeout=60,
    ).json()
    assert openai["choices"][0]["finish_reason"] == "stop"
