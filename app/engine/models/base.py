"""What a compact forward provides to the batch: embeddings, decoder layers, the LM head."""

from collections.abc import Callable

import torch

# attend(layer, q [N, heads, dim], k [N, kv_heads, dim], v [N, kv_heads, dim]) -> [N, heads * dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CompactModel:
    """A decoder-only LM as plain tensor code over flattened tokens [N, hidden].

    Every op is row-wise (norms, activations, residuals) or a GEMM over the rows, so a token's
    result depends only on its own row as long as GEMMs see a row count that is a multiple of
    `ROW_MULTIPLE` (MKL's fp32 kernels then give each row the same bits for any row count,
    measured here for every shape these models use). Attention is the caller's: it sees each
    sequence's own keys only.
    """

    family: str = ""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: torch.dtype
    kv_dtype: torch.dtype  # the KV cache's element type (TEXTGEN_KV_CACHE_DTYPE), set by the loader
    batch_invariant: bool = True  # TEXTGEN_BATCH_INVARIANT, set by the loader
    device: torch.device

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """ids, positions: [N] (N a multiple of ROW_MULTIPLE). Returns final hidden states [N, hidden]."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] for hidden states [N, hidden] (N a multiple of ROW_MULTIPLE)."""
        raise NotImplementedError


ROW_MULTIPLE = 4

# ATen's vectorised elementwise loops finish a contiguous range (per thread) with a scalar loop
# whose transcendental functions (exp, tanh) can differ from the vector ones in the last bit. A
# row whose width is not a multiple of this many elements can straddle that tail depending on the
# row count (measured: silu over [M, 172] changes the last row's bits with M), so such activations
# run on a zero-padded copy whose rows start and end on vector boundaries.
_ELEMENTWISE_ALIGN = 128


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, invariant: bool) -> torch.Tensor:
    """`fn(x)` for an elementwise `fn`; with `invariant`, each row's bits independent of the row count."""
    width = x.shape[-1]
    if not invariant or width % _ELEMENTWISE_ALIGN == 0:
        return fn(x)
    padded = x.new_zeros((x.shape[0], width + (-width) % _ELEMENTWISE_ALIGN))
    padded[:, :width] = x
    return fn(padded)[:, :width]
