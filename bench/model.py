"""The benchmark model (GPT-2-124M shape, random weights) and its fixed-length prompts."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/models/gpt2-tokenizer"
MARKER = "textgen-bench.json"
FALLBACK_VOCAB = 8192


@dataclass
class ModelInfo:
    path: Path
    tokenizer: str  # "gpt2" (the real GPT-2 BPE) or "bpe-<vocab>" (trained locally)
    n_params: int
    param_bytes: int
    n_layer: int
    n_embd: int
    vocab_size: int
    eos_token_id: int

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.n_layer * self.n_embd * dtype_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "tokenizer": self.tokenizer,
            "n_params": self.n_params,
            "param_bytes": self.param_bytes,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "dtype": "float32",
        }


def default_model_dir(seed: int) -> Path:
    kind = "gpt2tok" if (SHARED_TOKENIZER / "vocab.json").exists() else f"bpe{FALLBACK_VOCAB}"
    return Path(tempfile.gettempdir()) / "textgen-bench" / f"gpt2-124m-{kind}-seed{seed}"


def ensure_model(path: Path, seed: int = 0) -> ModelInfo:
    """Build the model in `path` unless a complete one is already there, and describe it."""
    marker = path / MARKER
    if marker.exists():
        return ModelInfo(**{**json.loads(marker.read_text()), "path": path})
    if (path / "config.json").exists():
        return ModelInfo(**{**_describe_existing(path), "path": path})  # not built here: use as it is
    _build(path, seed)
    return ModelInfo(**{**json.loads(marker.read_text()), "path": path})


def _build(path: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    if (SHARED_TOKENIZER / "vocab.json").exists():
        tok = AutoTokenizer.from_pretrained(SHARED_TOKENIZER)
        kind = "gpt2"
        config = GPT2Config()
    else:
        from app.finetune.tokenizer import python_docs_corpus, train_bpe_tokenizer

        tok = train_bpe_tokenizer(python_docs_corpus(), vocab_size=FALLBACK_VOCAB)
        kind = f"bpe-{len(tok)}"
        # Same depth and width as GPT-2-124M; only the embedding matrix follows the smaller vocabulary.
        config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(torch.float32).eval()
    eos = tok.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "tokenizer": kind,
        "n_params": n_params,
        "param_bytes": n_params * 4,
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "vocab_size": config.vocab_size,
        "eos_token_id": eos,
    }
    (tmp / MARKER).write_text(json.dumps(info, indent=1))
    if path.exists():  # an empty or partial directory the user named
        for child in tmp.iterdir():
            child.replace(path / child.name)
        tmp.rmdir()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)


def _describe_existing(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n_layer = getattr(config, "n_layer", None) or config.num_hidden_layers
    n_embd = getattr(config, "n_embd", None) or config.hidden_size
    # Parameter count from the safetensors headers, without loading the weights.
    n_params = 0
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                n_params += count
    info = {
        "tokenizer": type(tok).__name__,
        "n_params": n_params,
        "param_bytes": n_params * 4,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "vocab_size": config.vocab_size,
        "eos_token_id": tok.eos_token_id,
    }
    return info


def make_prompts(path: Path, count: int, length: int = 32) -> list[tuple[str, list[int]]]:
    """`count` distinct prompts of exactly `length` tokens: windows of the Python docs, kept only
    when the decoded text encodes back to the same ids (so a server that tokenizes the text sees
    exactly `length` tokens)."""
    from transformers import AutoTokenizer

    from app.finetune.tokenizer import python_docs_corpus

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 30  # the corpus is encoded whole; only windows reach the model
    ids: list[int] = tok("\n".join(python_docs_corpus()), add_special_tokens=False)["input_ids"]
    prompts: list[tuple[str, list[int]]] = []
    seen: set[str] = set()
    stride = 41
    for start in range(0, len(ids) - length, stride):
        window = ids[start : start + length]
        text = tok.decode(window)
        if text in seen or tok(text, add_special_tokens=False)["input_ids"] != window:
            continue
        seen.add(text)
        prompts.append((text, window))
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"only {len(prompts)} of {count} prompts of {length} tokens round-trip")
