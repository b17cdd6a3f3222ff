"""GPT-2 as a compact forward: HF's weights read in place (Conv1D's re-laid out as [out, in]), HF's arithmetic."""

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from app.engine.models.base import (
    Attend,
    CompactModel,
    LoraDeltas,
    Weight,
    adapted_linear,
    gemm_weight,
    head_weight,
    linear,
    row_multiple,
)
from app.engine.models.quantize import QuantizedLinear

_SLOTS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "gelu": "gelu"}


class GPT2Compact(CompactModel):
    family = "gpt2"

    @classmethod
    def wrap(cls, model: PreTrainedModel) -> "GPT2Compact | None":
        config = model.config
        approximate = _ACTIVATIONS.get(config.activation_function)
        if (
            approximate is None
            or getattr(config, "scale_attn_by_inverse_layer_idx", False)
            or getattr(config, "reorder_and_upcast_attn", False)
            or not getattr(config, "scale_attn_weights", True)
            or getattr(config, "add_cross_attention", False)
        ):
            return None
        return cls(model, approximate)

    def __init__(self, model: PreTrainedModel, approximate: str) -> None:
        config = model.config
        # get_parameter, not attribute access: nn.Module's __getattr__ is typed Tensor | Module.
        weight = model.get_parameter
        self.approximate = approximate
        self.layers = config.n_layer
        self.heads = self.kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.vocab_size = config.vocab_size
        self.eps = config.layer_norm_epsilon
        self.wte = weight("transformer.wte.weight")
        self.wpe = weight("transformer.wpe.weight")
        self.dtype = self.wte.dtype
        self.device = self.wte.device
        # Per block: (weight, bias) of ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj; the Conv1D
        # weights ([in, out]) in the layout `linear` takes (`gemm_weight`), sharing the HF storage.
        # Layers already turned into nn.Linear or QuantizedLinear (TEXTGEN_QUANTIZE) are [out, in]
        # and maybe int8/int4.

        def layer_weight(name: str) -> Weight:
            module = model.get_submodule(name.removesuffix(".weight"))
            if isinstance(module, QuantizedLinear):
                return module.weight
            return gemm_weight(weight(name), stored_out_in=isinstance(module, torch.nn.Linear))

        def gemm(i: int, name: str) -> tuple[Weight, torch.Tensor]:
            return layer_weight(f"transformer.h.{i}.{name}.weight"), weight(f"transformer.h.{i}.{name}.bias")

        def norm(i: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return weight(f"transformer.h.{i}.{name}.weight"), weight(f"transformer.h.{i}.{name}.bias")

        self.blocks = [
            (
                norm(i, "ln_1"),
                gemm(i, "attn.c_attn"),
                gemm(i, "attn.c_proj"),
                norm(i, "ln_2"),
                gemm(i, "mlp.c_fc"),
                gemm(i, "mlp.c_proj"),
            )
            for i in range(config.n_layer)
        ]
        self.ln_f = (weight("transformer.ln_f.weight"), weight("transformer.ln_f.bias"))
        self.lm_head = head_weight(model)  # [vocab, hidden]; tied to wte in GPT-2 unless quantized
        gemms = [self.lm_head] + [block[k][0] for block in self.blocks for k in (1, 2, 4, 5)]
        self.row_multiple = max(row_multiple(w) for w in gemms)

    def lora_targets(self) -> dict[str, tuple[int, str, int, int]]:
        return {
            f"transformer.h.{i}.{slot}": (i, slot, *weight.shape)
            for i, block in enumerate(self.blocks)
            for slot, (weight, _) in zip(_SLOTS, block, strict=True)
            if weight.dim() == 2
        }

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, lora: LoraDeltas | None = None
    ) -> torch.Tensor:
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        n, width = x.shape
        for i, (ln1, qkv, proj, ln2, fc, out) in enumerate(self.blocks):
            h = F.layer_norm(x, (width,), ln1[0], ln1[1], self.eps)
            q, k, v = adapted_linear(h, qkv[0], qkv[1], "none", lora, i, "attn.c_attn").split(width, dim=1)
            a = attend(
                i,
                q.view(n, self.heads, self.head_dim),
                k.view(n, self.heads, self.head_dim),
                v.view(n, self.heads, self.head_dim),
            )
            x = x + adapted_linear(a, proj[0], proj[1], "none", lora, i, "attn.c_proj")
            h = F.layer_norm(x, (width,), ln2[0], ln2[1], self.eps)
            h = adapted_linear(h, fc[0], fc[1], self.approximate, lora, i, "mlp.c_fc")
            x = x + adapted_linear(h, out[0], out[1], "none", lora, i, "mlp.c_proj")
        return F.layer_norm(x, (width,), self.ln_f[0], self.ln_f[1], self.eps)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head, None)
