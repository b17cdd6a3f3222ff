"""`TransformersRunner`: every causal LM that is not GPT-2 or Llama, on the transformers forward.

Rows are left-padded together in a `Batch` (app/engine/runner/batch.py) whose KV cache is a `SlabCache`
(app/engine/kv/kv_cache.py), a transformers `Cache` written in place into preallocated slabs. This
fallback keeps its slab cache behind the `Runner` protocol: the paged pool and the prefix cache are
the compact forward's (a left-padded cache has no per-row prefix to share), and so is speculative
decoding (exact verification needs the batch-invariant compact forward).
"""

import logging

import torch
from transformers import PreTrainedModel

from app.engine.core.sequence import Sequence
from app.engine.core.step import Reservation
from app.engine.kv.kv_cache import KVAccount
from app.engine.runner import speculative as spec
from app.engine.runner.batch import Batch
from app.engine.runner.invariants import check_slab_batch
from app.engine.runner.runner import BatchRunner
from app.engine.runner.speculative import SpeculativeConfig

log = logging.getLogger("textgen.engine")


class TransformersRunner(BatchRunner[Batch]):
    def __init__(self, model: PreTrainedModel, kv: KVAccount, speculative: SpeculativeConfig | None = None) -> None:
        super().__init__(model.device, kv)
        self.model = model
        if speculative is not None:
            log.warning(
                "TEXTGEN_SPECULATIVE is off: exact verification is not possible on %s", spec.unsupported_reason(None)
            )

    def prefill(
        self, seqs: list[Sequence], all_logits: bool = False, prefix_room: int = 0
    ) -> tuple[Batch, torch.Tensor, torch.Tensor | None]:
        return Batch.prefill(self.model, seqs, all_logits, self.kv)

    def decode(self, batch: Batch) -> torch.Tensor:
        return batch.decode(self.model)

    def join(self, batch: Batch, joined: Batch) -> None:
        batch.extend(joined)
        joined.cache.release()

    def reserve(self, batch: Batch, seqs: list[Sequence], reservation: Reservation) -> None:
        batch.cache.columns = reservation.columns(seqs)
        batch.cache.max_rows = reservation.spare_rows(seqs)  # only the slab cache keeps spare rows

    def free(self, batch: Batch) -> None:
        batch.cache.release()

    def check(self) -> None:
        if self.batch is not None:
            check_slab_batch(self.batch)
