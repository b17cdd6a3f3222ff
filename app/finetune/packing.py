"""Tokenise examples, join them with EOS and cut the stream into fixed-size training blocks."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from app.finetune.examples import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value HF causal-LM losses skip


@dataclass
class PackedBlocks(Dataset):
    """`[n_blocks, block_size]` tensors; padding has attention 0 and label IGNORE_INDEX."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "PackedBlocks":
        index = torch.as_tensor(indices, dtype=torch.long)
        return PackedBlocks(self.input_ids[index], self.attention_mask[index], self.labels[index])

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is taken on; a block's first label is never a target after the shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, special: bool) -> list[list[int]]:
    # One batch call lets a fast tokenizer work in parallel; verbose=False because documents longer
    # than the model's context are expected here, before packing cuts them.
    return tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"] if texts else []


def tokenize(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """One token stream and its labels; prompts are masked so only completions are learned."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which packing needs between documents")
    prompted = [ex for ex in examples if ex.prompt]
    # The first segment of an example gets the tokenizer's special prefix (Llama's BOS); a completion
    # that follows a prompt does not.
    prompt_ids = iter(_ids(tokenizer, [ex.prompt for ex in prompted], special=True))
    after_ids = iter(_ids(tokenizer, [ex.completion for ex in prompted], special=False))
    alone_ids = iter(_ids(tokenizer, [ex.completion for ex in examples if not ex.prompt], special=True))

    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ex.prompt:
            masked = next(prompt_ids)
            ids += masked
            labels += [IGNORE_INDEX] * len(masked)
            completion = list(next(after_ids))
        else:
            completion = list(next(alone_ids))
        if not completion or completion[-1] != eos:
            completion.append(eos)
        ids += completion
        labels += completion
    return ids, labels


def pack(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, block_size: int, *, what: str = "data"
) -> PackedBlocks:
    ids, labels = tokenize(examples, tokenizer)
    n_blocks = -(-len(ids) // block_size)
    pad = n_blocks * block_size - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The tail is padded rather than dropped: on small data it can be a real share of the text.
    input_ids = torch.tensor(ids + [pad_id] * pad, dtype=torch.long).view(n_blocks, block_size)
    label_t = torch.tensor(labels + [IGNORE_INDEX] * pad, dtype=torch.long).view(n_blocks, block_size)
    mask = torch.ones(n_blocks * block_size, dtype=torch.long)
    if pad:
        mask[-pad:] = 0
    blocks = PackedBlocks(input_ids, mask.view(n_blocks, block_size), label_t)
    # A block with no target (all prompt, or a one-token tail) would give a 0/0 loss.
    useful = (blocks.labels[:, 1:] != IGNORE_INDEX).any(dim=1)
    dropped = int((~useful).sum())
    if dropped:
        blocks = blocks.subset(torch.nonzero(useful).flatten())
    log.info(
        "%s: %d examples -> %s tokens in %d blocks of %d (last block padded by %d, %d without targets dropped); "
        "loss on %s tokens",
        what,
        len(examples),
        f"{len(ids):,}",
        len(blocks),
        block_size,
        pad,
        dropped,
        f"{blocks.target_tokens:,}",
    )
    return blocks
