"""Compact forwards of our own for the families that matter (GPT-2, Llama), over the paged KV pool (`kv_pool.py`).

They read the HF module's weights in place (only the LM head is also kept transposed) and follow
HF's arithmetic, so logits match HF's (tests state the tolerance). Every other causal LM keeps the
HF forward. `compact_model` says which applies.
"""

from transformers import PreTrainedModel

from app.engine.models.base import CompactModel


def compact_model(model: PreTrainedModel) -> CompactModel | None:
    """Our forward for `model`, or None when it is not a family (or variant) we implement."""
    model_type = getattr(model.config, "model_type", None)
    if model_type == "gpt2":
        from app.engine.models.gpt2 import GPT2Compact

        return GPT2Compact.wrap(model)
    if model_type == "llama":
        from app.engine.models.llama import LlamaCompact

        return LlamaCompact.wrap(model)
    return None


__all__ = ["CompactModel", "compact_model"]
