"""Model shapes for `--from-scratch SIZE`: GPT-2 architecture, sized for a CPU or one small GPU."""

from dataclasses import dataclass

from transformers import GPT2Config


@dataclass(frozen=True)
class ScratchSize:
    n_embd: int
    n_layer: int
    n_head: int


# "small" is what the offline demo model uses: a shape that learns readable text from the ~120k-token
# Python docs corpus in about a minute of training on two CPU cores.
SCRATCH_SIZES: dict[str, ScratchSize] = {
    "tiny": ScratchSize(n_embd=64, n_layer=2, n_head=4),
    "small": ScratchSize(n_embd=192, n_layer=4, n_head=6),
    "medium": ScratchSize(n_embd=512, n_layer=8, n_head=8),
}


def scratch_config(size: str, *, vocab_size: int, n_positions: int, eos_token_id: int) -> GPT2Config:
    shape = SCRATCH_SIZES[size]
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        # GPT-2's default dropout of 0.1 only slows learning at these sizes and step counts.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
