"""Shared fixtures: tiny real models (random weights, trained tokenizers) built offline."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def build_tiny_gpt2(path: Path, *, n_positions: int = 256, seed: int = 0) -> Path:
    """A 2-layer GPT-2 with a BPE tokenizer trained on the Python docs. The large initializer
    range makes logits peaked, so greedy decoding has no near-ties that float rounding between
    batch shapes could flip."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from app.finetune.tokenizer import python_docs_corpus, train_bpe_tokenizer

    tok = train_bpe_tokenizer(python_docs_corpus(), vocab_size=1024)
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    path = SHARED_MODELS / "stories260k"
    if not (path / "config.json").exists():
        pytest.skip(f"real model not available: {path} is absent (it lives in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    path = SHARED_MODELS / "gpt2-tokenizer"
    if not (path / "vocab.json").exists():
        pytest.skip(f"GPT-2 tokenizer not available: {path} is absent (it lives in ../shared)")
    return path
