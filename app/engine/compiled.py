"""TEXTGEN_COMPILE: the compact forward's decode step through `torch.compile`.

What is compiled is `compact_batch.decode_logits`, a whole decode step of a compact model (GPT-2,
Llama): embeddings, every layer (norms, GEMMs, the KV-cache write, decode attention) and the LM
head, as one graph. Shapes are dynamic (`torch.compile(dynamic=True)`): one graph serves every
batch size and KV width, so no buckets are needed and nothing is padded beyond what the eager step
pads. torch specializes sizes of 1, so one running row, a cache of one row and a KV width of one
attention chunk get graphs of their own: `warm_up` compiles the six at startup (serving then
compiles no more: tested in tests/unit/engine/test_compiled.py).

Backends (https://pytorch.org/docs/stable/torch.compiler.html):
- CPU: inductor's C++/OpenMP kernels fuse the norms, residuals, masks and softmax; the GEMMs stay
  oneDNN's, called as an opaque op (`models/base.py` `onednn_linear_op`), so a row's bits do not
  depend on the batch with compile on either (tested). Inductor's fused reductions round differently
  from eager's: logits differ from the eager step's by ~1e-6, so greedy tokens agree (tested) but
  logprobs are not bitwise those of TEXTGEN_COMPILE=false.
- CUDA: mode="reduce-overhead": CUDA graphs through torch's cudagraph trees, as vLLM and gpt-fast
  capture their decode steps. Not run here (no GPU lent to this project yet); bench/gpu.sh measures it.

Compiling takes minutes on 2 cores (README "Compiled decode step" has the measured time); inductor
caches its kernels on disk (TORCHINDUCTOR_CACHE_DIR), so a restart with the same model compiles faster.
"""

import logging
import time
from typing import Any

import torch

from app.engine.attention import CHUNK
from app.engine.compact_batch import decode_context, decode_logits
from app.engine.lora import LoraRows
from app.engine.models.base import CompactModel, padded_rows
from app.engine.row_cache import RowCache

log = logging.getLogger("textgen.engine")


class CompiledDecode:
    """`decode_logits` compiled for one model; called as `decode_logits` is."""

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
        self, model: CompactModel, ids: torch.Tensor, positions: torch.Tensor, lora: LoraRows | None = None
    ) -> torch.Tensor:
        if lora is not None:  # the server refuses TEXTGEN_COMPILE with adapters; see app/service.py
            raise ValueError("the compiled decode step does not run LoRA adapters")
        self.steps += 1
        return self._step(model, ids, positions, None)

    def warm_up(self, model: CompactModel) -> float:
        """Compile the graphs serving traffic will use, logging progress: 1 and 2+ running rows, each
        with KV widths of 1 and 2+ attention chunks. Returns the seconds it took. Raises what
        torch.compile raises (the loader turns it into a load error naming TEXTGEN_COMPILE)."""
        start = time.perf_counter()
        # Row counts of 1 get a graph of their own (torch specializes sizes of 1); the GEMMs pad
        # rows to `row_multiple`, so with fp32 (a multiple of 2) every step runs one graph.
        counts = sorted({padded_rows(1, model), padded_rows(2, model)})
        for i, rows in enumerate(counts, 1):
            log.info(
                "compiling the decode step, graph %d/%d (%d rows; torch.compile %s, mode %s)...",
                i,
                len(counts),
                rows,
                self.backend,
                self.mode,
            )
            began = time.perf_counter()
            with torch.inference_mode():  # as the engine runs: guards check for inference tensors
                kv, ids, positions, lengths = _dummy_step(model, min(rows, 2))
                with decode_context(kv, lengths, CHUNK):
                    self(model, ids, positions)
            self.graphs.append(f"decode, {'1 row' if rows == 1 else '2+ rows'} (any KV width)")
            log.info("compiled graph %d/%d in %.1f s", i, len(counts), time.perf_counter() - began)
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


def _dummy_step(model: CompactModel, real: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's cache, ids, positions and lengths for `real` rows of 3 cached tokens (zeros)."""
    cache = RowCache(model.layers, model.kv_heads, model.head_dim, model.kv_dtype, model.device)
    cache.reserve(real, 4)
    n = padded_rows(real, model)
    ids = torch.zeros(n, dtype=torch.long, device=model.device)
    positions = torch.zeros(n, dtype=torch.long, device=model.device)
    positions[:real] = 3
    return cache.kv, ids, positions, torch.full((real,), 4, device=model.device)
