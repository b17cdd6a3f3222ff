"""huggingface_hub's InferenceClient against the TGI routes (POST / and /embed)."""

import math

import pytest
from huggingface_hub import InferenceClient, constants

from tests.e2e.server import Server


@pytest.fixture(autouse=True)
def _allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session runs with HF_HUB_OFFLINE=1 (no hub here), which also blocks the client's
    # requests to our own server on 127.0.0.1.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_text_generation_details(server: Server) -> None:
    client = InferenceClient(base_url=server.url)
    out = client.text_generation("The list", max_new_tokens=6, details=True, decoder_input_details=True)
    assert out.details.finish_reason in ("length", "eos_token")
    assert out.details.generated_tokens == len(out.details.tokens) <= 6
    assert out.details.prefill[0].logprob is None
    plain = client.text_generation("The list", max_new_tokens=6)
    assert plain == out.generated_text


def test_text_generation_stream(server: Server) -> None:
    client = InferenceClient(base_url=server.url)
    plain = client.text_generation("The list", max_new_tokens=8)
    chunks = list(client.text_generation("The list", max_new_tokens=8, stream=True, details=True))
    assert chunks[-1].generated_text == plain
    assert chunks[-1].details.generated_tokens == len(chunks)
    text = "".join(c.token.text for c in chunks if not c.token.special)
    assert text == plain
    tokens = list(client.text_generation("The list", max_new_tokens=8, stream=True))
    assert "".join(tokens) == plain


def test_seeded_sampling(server: Server) -> None:
    client = InferenceClient(base_url=server.url)
    a = client.text_generation("The list", max_new_tokens=8, do_sample=True, seed=3, temperature=0.7)
    b = client.text_generation("The list", max_new_tokens=8, do_sample=True, seed=3, temperature=0.7)
    assert a == b


def test_feature_extraction(server: Server) -> None:
    client = InferenceClient(base_url=f"{server.url}/embed")
    vec = client.feature_extraction("What is a list?")
    assert vec.ndim == 2 and vec.shape[0] == 1
    assert math.isclose(float((vec[0] ** 2).sum()), 1.0, rel_tol=1e-4)
