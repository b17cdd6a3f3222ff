"""TEXTGEN_COMPILE: the compact forward's decode step through `torch.compile`.

What is compiled is `compact_batch.decode_logits`, a whole decode step of a compact model (GPT-2,
Llama): embeddings, every layer's norms, GEMMs and residuals, and the LM head, as one graph with
dynamic shapes (`torch.compile(dynamic=True)`). Two things are opaque custom ops inside it: oneDNN's
GEMMs (`models/base.py` `onednn_linear_op`: the eager kernels, so a row's bits do not depend on the
batch) and the KV-cache write plus decode attention (`compact_batch.decode_attend`, reading the
step's cache from `decode_context`), whose shapes (rows, KV width, cache layout) would otherwise each
specialize graphs. The graph's only size is the row count; torch specializes a count of 1, so
compiled steps always run 2+ rows (`CompactBatch.decode`) and `warm_up` compiles the one graph that
serves every step (tests/unit/engine/test_compiled.py checks that serving compiles no other).

Backends (https://pytorch.org/docs/stable/torch.compiler.html):
- CPU: inductor's C++/OpenMP kernels. Its fused norms round differently from eager's: logits differ
  from the eager step's by ~2e-5 (fp32), so greedy tokens agree (tested) but logprobs are not bitwise
  those of TEXTGEN_COMPILE=false; batch invariance holds with compile on (tested, fp32 and bf16).
  Measured: no faster than eager in fp32 (the GEMMs dominate and stay opaque); int8-dynamic reaches
  fp32's speed (README "Compiled decode step").
- CUDA: mode="reduce-overhead": CUDA graphs through torch's cudagraph trees, as vLLM and gpt-fast
  capture their decode steps. Not run here (no GPU lent to this project yet); bench/gpu.sh measures it.

Compiling the GPT-2-124M step takes ~30 s on 2 cores; inductor caches its kernels on disk
(TORCHINDUCTOR_CACHE_DIR), so a restart with the same model compiles in seconds.
"""

import logging
import time
from typing import Any

import torch

from app.engine.kv.kv_pool import KVPool, PagedRows
from app.engine.models.base import CompactModel, LoraDeltas, padded_rows
from app.engine.runner.compact_batch import decode_context, decode_logits
from app.engine.runner.forward_options import ForwardOptions

log = logging.getLogger("textgen.engine")


class CompiledDecode:
    """`decode_logits` compiled for one model; called as `decode_logits` is (a `DecodeStep`, which
    the loader puts in the runner's `ForwardOptions.compiled`)."""

    def __init__(self, model: CompactModel) -> None:
        self.device = model.device
        self.mode = "reduce-overhead" if model.device.type == "cuda" else "default"
        self.backend = "inductor"
        # Sizes that happen to be equal are not the same size (duck shaping would guard that the KV
        # axis, 2, equals the batch, and recompile when it does not).
        torch.fx.experimental._config.use_duck_shape = False
        self._step = torch.compile(decode_logits, dynamic=True, fullgraph=True, mode=self.mode)
        self.warmup_s: float | None = None
        self.graphs: list[str] = []
        self.steps = 0  # decode steps run compiled (warm-up included)

    def __call__(
        self, model: CompactModel, ids: torch.Tensor, positions: torch.Tensor, lora: LoraDeltas | None = None
    ) -> torch.Tensor:
        if lora is not None:  # the server refuses TEXTGEN_COMPILE with adapters; see app/service.py
            raise ValueError("the compiled decode step does not run LoRA adapters")
        self.steps += 1
        return self._step(model, ids, positions, None)

    def warm_up(self, model: CompactModel, options: ForwardOptions) -> float:
        """Compile the graph serving uses (any row count from 2, any KV width) on a cache in
        `options.kv_dtype` with rows padded as `options` pad them, logging progress. Returns the
        seconds it took. Raises what torch.compile raises (the loader turns it into a load error
        naming TEXTGEN_COMPILE)."""
        start = time.perf_counter()
        log.info("compiling the decode step (torch.compile %s, mode %s)...", self.backend, self.mode)
        with torch.inference_mode():  # as the engine runs: guards check for inference tensors
            cache, ids, positions, after = _dummy_step(model, options, 1)
            with decode_context(cache, after):
                self(model, ids, positions)
        self.graphs.append("decode, any rows and KV width")
        self.warmup_s = time.perf_counter() - start
        return self.warmup_s

    def describe(self) -> dict[str, Any]:
        """What /info reports under `compile`."""
        return {
            "enabled": True,
            "backend": self.backend,
            "mode": self.mode,
            "dynamic_shapes": True,
            "graphs": list(self.graphs),
            "warmup_seconds": None if self.warmup_s is None else round(self.warmup_s, 1),
        }


def _dummy_step(
    model: CompactModel, options: ForwardOptions, real: int
) -> tuple[PagedRows, torch.Tensor, torch.Tensor, list[int]]:
    """A decode step's cache, ids, positions and lengths after it for `real` rows of 3 cached
    tokens (zeros), padded to 2+ rows as `CompactBatch.decode` pads compiled steps."""
    pool = KVPool(model.layers, model.kv_heads, model.head_dim, options.kv_dtype, model.device)
    cache = PagedRows(pool, [[] for _ in range(real)], [3] * real)
    cache.grow([4] * real)
    n = max(padded_rows(real, options.row_multiple(model)), 2)
    ids = torch.zeros(n, dtype=torch.long, device=model.device)
    positions = torch.zeros(n, dtype=torch.long, device=model.device)
    positions[:real] = 3
    return cache, ids, positions, [4] * real
