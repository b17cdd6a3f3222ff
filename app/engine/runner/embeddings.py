"""Sentence embeddings: pool a model's last hidden states over the real (non-padding) tokens,
then L2-normalise if the model (or the request) says so, as sentence-transformers does."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import cached_file

Pooling = Literal["mean", "cls", "last"]


@dataclass
class Embedder:
    """`encoder` returns `last_hidden_state`: the base of a causal LM, or a dedicated encoder.

    `normalize_module`: the model ends in a Normalize module, so its vectors are always
    L2-normalised. `normalize_default`: whether routes without a `normalize` field (OpenAI's)
    normalise: a sentence-transformers model's own choice, and yes for a causal LM's pooling."""

    encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_tokens: int
    pooling: Pooling = "mean"
    normalize_default: bool = True
    model_id: str = ""
    normalize_module: bool = False

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
    encoder = cast(PreTrainedModel, model.base_model)  # the LM's backbone; typed as a bare Module
    return Embedder(encoder, tokenizer, max_tokens, "mean", True, model_id)


class UnsupportedEmbeddingModel(ValueError):
    """The sentence-transformers pipeline has a module or mode textgen does not apply."""


def _config_file(model_id: str, filename: str) -> dict | list | None:
    """A JSON file of `model_id`, a local directory or a hub id (through the HF cache, which
    works offline); None when the model has no such file."""
    path = cached_file(
        model_id,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


# Pooling modes textgen applies, by their name in sentence-transformers < 6 (one boolean
# `pooling_mode_<name>` each) and in 6 and later (one `pooling_mode` string or list).
_POOLING_FLAGS: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_POOLING_NAMES: dict[str, Pooling] = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


def _pooling(config: dict) -> Pooling:
    if "pooling_mode" in config:
        named = config["pooling_mode"]
        modes = [named] if isinstance(named, str) else list(named)
        known = _POOLING_NAMES
    else:
        modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
        known = _POOLING_FLAGS
    if len(modes) != 1 or modes[0] not in known:
        raise UnsupportedEmbeddingModel(
            f"its Pooling module uses {modes or 'no mode'}; textgen applies exactly one of CLS, mean or last-token"
        )
    return known[modes[0]]


def load_sentence_transformer(model_id: str, device: torch.device) -> Embedder:
    """A sentence-transformers model (local directory or hub id): its modules.json decides the
    pooling (from the Pooling module's config) and whether vectors are normalised (a Normalize
    module); the transformer itself is loaded with AutoModel. Raises UnsupportedEmbeddingModel
    for modules that would change the vectors and that textgen does not apply (e.g. Dense)."""
    pooling: Pooling = "mean"
    normalize = False
    modules = _config_file(model_id, "modules.json")
    for module in modules if isinstance(modules, list) else []:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = _config_file(model_id, f"{module['path']}/config.json".lstrip("/"))
            if isinstance(config, dict):
                pooling = _pooling(config)
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise UnsupportedEmbeddingModel(
                f"its modules.json has a {kind} module, which textgen does not apply; its vectors would differ "
                "from sentence-transformers'"
            )
    max_tokens = 512
    st_config = _config_file(model_id, "sentence_bert_config.json")
    if isinstance(st_config, dict) and st_config.get("max_seq_length"):
        max_tokens = int(st_config["max_seq_length"])
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    encoder = AutoModel.from_pretrained(model_id).to(device).eval()
    return Embedder(encoder, tokenizer, max_tokens, pooling, normalize, model_id, normalize_module=normalize)
