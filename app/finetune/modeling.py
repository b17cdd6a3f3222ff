"""The tokenizer and model a run starts from: a pretrained base, or a new GPT-2 for --from-scratch."""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.finetune.config import ConfigError, FinetuneConfig
from app.finetune.examples import Example
from app.finetune.sizes import scratch_config
from app.finetune.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

SCRATCH_BLOCK_SIZE = 256
MAX_DEFAULT_BLOCK_SIZE = 512


def load_tokenizer(
    config: FinetuneConfig, examples: Sequence[Example], saved: Path | None = None
) -> PreTrainedTokenizerBase:
    """`saved` is a tokenizer an interrupted run already trained: a resumed run must reuse it."""
    if saved is not None and (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    if config.model is not None:
        try:
            return AutoTokenizer.from_pretrained(config.model)
        except OSError as exc:
            raise ConfigError(f"--model {config.model}: cannot load its tokenizer ({exc})") from None
    log.info("training a %d-token BPE tokenizer on the data", config.vocab_size)
    return train_bpe_tokenizer((ex.prompt + ex.completion for ex in examples), config.vocab_size)


def context_length(model: PreTrainedModel) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            return value
    return None


def choose_block_size(config: FinetuneConfig, context: int | None) -> int:
    if config.block_size is not None:
        if context is not None and config.block_size > context:
            raise ConfigError(f"--block-size {config.block_size} exceeds the model's context of {context}")
        return config.block_size
    if config.from_scratch:
        return SCRATCH_BLOCK_SIZE
    return min(MAX_DEFAULT_BLOCK_SIZE, context or MAX_DEFAULT_BLOCK_SIZE)


def load_base(config: FinetuneConfig) -> PreTrainedModel:
    """A pretrained model in full precision: the training master copy and the base LoRA merges into."""
    assert config.model is not None
    try:
        return AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(f"--model {config.model}: cannot load it ({exc})") from None


def new_model(config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase, block_size: int) -> PreTrainedModel:
    assert config.from_scratch is not None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token, which a new model needs")
    model = GPT2LMHeadModel(
        scratch_config(config.from_scratch, vocab_size=len(tokenizer), n_positions=block_size, eos_token_id=eos)
    )
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    log.info("new %s GPT-2 model: %s parameters", config.from_scratch, f"{model.num_parameters():,}")
    return model


def ensure_generation_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation must stop at the EOS that packing taught the model to emit between documents."""
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
