"""Sentence embeddings: pool a model's last hidden states over the real (non-padding) tokens."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

Pooling = Literal["mean", "cls", "last"]


@dataclass
class Embedder:
    """`encoder` returns `last_hidden_state`: the base of a causal LM, or a dedicated encoder."""

    encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_tokens: int
    pooling: Pooling = "mean"
    normalize_default: bool = True
    model_id: str = ""

    @property
    def dimensions(self) -> int:
        return int(self.encoder.config.hidden_size)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], normalize: bool) -> list[list[float]]:
        device = self.encoder.device
        longest = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), longest), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[torch.arange(len(batch), device=device), mask.sum(1) - 1]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        if normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().tolist()


def from_causal_lm(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_tokens: int, model_id: str
) -> Embedder:
    return Embedder(model.base_model, tokenizer, max_tokens, "mean", True, model_id)


def load_sentence_transformer(model_id: str, device: torch.device) -> Embedder:
    """A sentence-transformers directory: its modules.json and pooling config decide the pooling
    and whether vectors are normalised; the transformer itself is loaded with AutoModel."""
    root = Path(model_id)
    pooling: Pooling = "mean"
    normalize = False
    modules_file = root / "modules.json"
    if modules_file.exists():
        for module in json.loads(modules_file.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                config = json.loads((root / module["path"] / "config.json").read_text())
                if config.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif config.get("pooling_mode_lasttoken"):
                    pooling = "last"
            elif kind.endswith("Normalize"):
                normalize = True
    max_tokens = 512
    st_config = root / "sentence_bert_config.json"
    if st_config.exists():
        max_tokens = int(json.loads(st_config.read_text()).get("max_seq_length", max_tokens))
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    encoder = AutoModel.from_pretrained(model_id).to(device).eval()
    return Embedder(encoder, tokenizer, max_tokens, pooling, normalize, model_id)
