"""The real trained Llama (../shared/models/stories260k): the server's greedy output is exactly
what transformers' model.generate produces, and text keeps SentencePiece's leading spaces."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.server import run_server

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park. They", "One day"]


@pytest.fixture(scope="module")
def stories_url(stories260k_dir: Path) -> Iterator[str]:
    with run_server(stories260k_dir) as url:
        yield url


def reference(model_dir: Path, prompt: str, n: int) -> tuple[str, list[int], str]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1] :].tolist()
    full = tok.decode(out[0], skip_special_tokens=True)
    prompt_text = tok.decode(ids[0], skip_special_tokens=True)
    return full[len(prompt_text) :], new, full


def test_greedy_matches_model_generate(stories_url: str, stories260k_dir: Path) -> None:
    def one(prompt: str) -> dict:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 40, "details": True}}
        return httpx.post(f"{stories_url}/generate", json=body, timeout=60).json()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together, different lengths
        results = list(pool.map(one, PROMPTS))
    for prompt, out in zip(PROMPTS, results, strict=True):
        expected_text, expected_ids, full = reference(stories260k_dir, prompt, 40)
        assert [t["id"] for t in out["details"]["tokens"]][: len(expected_ids)] == expected_ids
        if out["details"]["finish_reason"] == "length":
            assert out["generated_text"] == expected_text
            assert prompt + out["generated_text"] == full


def test_known_continuation(stories_url: str) -> None:
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3, "details": True}}
    out = httpx.post(f"{stories_url}/generate", json=body, timeout=60).json()
    assert out["generated_text"].startswith(",")  # from the model's README


def test_stream_keeps_leading_spaces(stories_url: str, stories260k_dir: Path) -> None:
    from tests.e2e.sse import events

    expected_text, _, _ = reference(stories260k_dir, "The little dog", 30)
    body = {"inputs": "The little dog", "parameters": {"max_new_tokens": 30}}
    with httpx.stream("POST", f"{stories_url}/generate_stream", json=body, timeout=60) as r:
        evs = list(events(r))
    streamed = "".join(e["token"]["text"] for e in evs if not e["token"]["special"])
    assert streamed == evs[-1]["generated_text"] == expected_text
    assert expected_text.startswith(" ")
