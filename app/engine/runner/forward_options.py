"""How the compact runner runs a model's forward: the serving choices that are not the model's math.

The model files (app/engine/models/) own the math of one forward over [N] tokens; which kernels
serve it (padded for batch invariance or not), which element type the KV cache stores and whether
the decode step is compiled are the runner's, set once at load from Settings
(TEXTGEN_BATCH_INVARIANT, TEXTGEN_KV_CACHE_DTYPE, TEXTGEN_COMPILE) and passed to the batch code.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from app.engine.models.base import CompactModel, LoraDeltas


class DecodeStep(Protocol):
    """A whole decode step run as one callable (`app.engine.runner.compiled.CompiledDecode`, built
    by the loader for TEXTGEN_COMPILE). A protocol so that these options do not import the compiled
    step, which is built on the batch code that reads them."""

    def __call__(
        self, model: CompactModel, ids: torch.Tensor, positions: torch.Tensor, lora: LoraDeltas | None = None
    ) -> torch.Tensor:
        """Next-token logits [N, vocab] for ids, positions [N]."""
        ...

    def describe(self) -> dict[str, Any]:
        """What /info reports under `compile`."""
        ...


@dataclass(frozen=True)
class ForwardOptions:
    """The compact forward's serving options.

    batch_invariant: every GEMM runs a row count that is a multiple of the model's `row_multiple`
    and prefill attention runs in fixed chunks, so a row's bits do not depend on its batchmates
    (TEXTGEN_BATCH_INVARIANT; CPU only, the loader turns it off on GPU).
    kv_dtype: the KV cache's element type (TEXTGEN_KV_CACHE_DTYPE; "auto" is the model's dtype).
    compiled: the decode step compiled (TEXTGEN_COMPILE), else None (the eager step)."""

    batch_invariant: bool
    kv_dtype: torch.dtype
    compiled: DecodeStep | None = None

    def row_multiple(self, model: CompactModel) -> int:
        """The row count `model`'s GEMMs are padded to a multiple of: its weights' `row_multiple`
        when batch invariant, else 1 (no padding)."""
        return model.row_multiple if self.batch_invariant else 1

    def describe_compile(self) -> dict[str, Any]:
        """What /info reports under `compile`: the compiled step's description, or
        {"enabled": False}."""
        return {"enabled": False} if self.compiled is None else self.compiled.describe()
