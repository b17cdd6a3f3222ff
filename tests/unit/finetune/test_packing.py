"""Packing: documents joined with EOS, cut into blocks, the tail padded and masked, prompts masked."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from app.finetune.examples import Example
from app.finetune.packing import IGNORE_INDEX, pack


def test_stream_is_joined_with_eos_and_the_tail_is_padded_not_dropped(tiny_gpt2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    docs = ["first document here", "and a second one, a little longer than the first"]
    expected = tok(docs[0])["input_ids"] + [tok.eos_token_id] + tok(docs[1])["input_ids"] + [tok.eos_token_id]
    # A tail of one token has no target after the shift (and is dropped); two or more must be kept.
    size = next(n for n in range(4, 12) if len(expected) % n >= 2)
    blocks = pack([Example(d) for d in docs], tok, block_size=size)

    assert len(blocks) == -(-len(expected) // size)
    real = blocks.attention_mask.flatten().bool()
    assert blocks.input_ids.flatten()[real].tolist() == expected
    assert blocks.labels.flatten()[real].tolist() == expected
    pad = len(blocks) * size - len(expected)
    assert pad > 0
    assert blocks.attention_mask[-1, -pad:].sum() == 0
    assert (blocks.labels[-1, -pad:] == IGNORE_INDEX).all()
    assert blocks.tokens == len(expected)


def test_prompt_tokens_are_masked_and_completion_tokens_are_targets(tiny_gpt2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    blocks = pack([Example(completion=" the answer", prompt="Question: what?")], tok, block_size=64)
    prompt_ids = tok("Question: what?")["input_ids"]
    answer_ids = tok(" the answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = blocks.labels[0]
    assert blocks.input_ids[0, : len(prompt_ids) + len(answer_ids)].tolist() == prompt_ids + answer_ids
    assert (labels[: len(prompt_ids)] == IGNORE_INDEX).all()
    assert labels[len(prompt_ids) : len(prompt_ids) + len(answer_ids)].tolist() == answer_ids
    assert blocks.target_tokens == len(answer_ids)


def test_blocks_without_any_target_are_dropped(tiny_gpt2_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    long_prompt = "word " * 40
    blocks = pack([Example(completion=" yes", prompt=long_prompt)], tok, block_size=8)
    assert len(blocks) >= 1
    assert all((row[1:] != IGNORE_INDEX).any() for row in blocks.labels)
    assert torch.equal(blocks.labels[-1][blocks.attention_mask[-1].bool()][-1:], torch.tensor([tok.eos_token_id]))
