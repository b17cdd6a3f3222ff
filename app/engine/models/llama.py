"""Llama as a compact forward: HF's weights read in place, HF's RMSNorm and rotary embedding."""

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

Gemm = tuple[Weight, torch.Tensor | None]  # a linear layer's (weight, bias)


def _gemm(module: torch.nn.Module) -> Gemm:
    """An nn.Linear's or QuantizedLinear's weight as `linear` takes it (`gemm_weight`), and its bias."""
    if isinstance(module, QuantizedLinear):
        return module.weight, module.bias
    assert isinstance(module, torch.nn.Linear)
    return gemm_weight(module.weight, stored_out_in=True), module.bias


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF's LlamaRMSNorm: the statistics in float32, the scale in the model's dtype.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaCompact(CompactModel):
    family = "llama"

    @classmethod
    def wrap(cls, model: PreTrainedModel) -> "LlamaCompact | None":
        config = model.config
        if config.hidden_act != "silu" or getattr(config, "sliding_window", None):
            return None
        return cls(model)

    def __init__(self, model: PreTrainedModel) -> None:
        config = model.config
        m = model.model
        self.layers = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.embed = m.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.rotary = m.rotary_emb  # HF's module: every rope variant (scaling types) as HF computes it
        # Per block: ln1, q, k, v, o, ln2, gate, up, down; each projection a (weight, bias) pair.
        self.blocks: list[tuple[torch.Tensor, Gemm, Gemm, Gemm, Gemm, torch.Tensor, Gemm, Gemm, Gemm]] = [
            (
                b.input_layernorm.weight,
                _gemm(b.self_attn.q_proj),
                _gemm(b.self_attn.k_proj),
                _gemm(b.self_attn.v_proj),
                _gemm(b.self_attn.o_proj),
                b.post_attention_layernorm.weight,
                _gemm(b.mlp.gate_proj),
                _gemm(b.mlp.up_proj),
                _gemm(b.mlp.down_proj),
            )
            for b in m.layers
        ]
        self.norm = m.norm.weight
        self.lm_head = head_weight(model)  # [vocab, hidden]
        gemms = [self.lm_head] + [g[0] for block in self.blocks for g in (*block[1:5], *block[6:])]
        self.row_multiple = max(row_multiple(w) for w in gemms)

    def lora_targets(self) -> dict[str, tuple[int, str, int, int]]:
        attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        slots = (*attention, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        return {
            f"model.layers.{i}.{slot}": (i, slot, *gemm[0].shape)
            for i, block in enumerate(self.blocks)
            for slot, gemm in zip(slots, (*block[1:5], *block[6:]), strict=True)
        }

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, lora: LoraDeltas | None = None
    ) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        n = x.shape[0]
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [N, 1, head_dim]
        for i, (ln1, wq, wk, wv, wo, ln2, gate, up, down) in enumerate(self.blocks):
            h = _rms_norm(x, ln1, self.eps)
            q = adapted_linear(h, wq[0], wq[1], "none", lora, i, "self_attn.q_proj")
            k = adapted_linear(h, wk[0], wk[1], "none", lora, i, "self_attn.k_proj")
            v = adapted_linear(h, wv[0], wv[1], "none", lora, i, "self_attn.v_proj")
            q = q.view(n, self.heads, self.head_dim)
            k = k.view(n, self.kv_heads, self.head_dim)
            v = v.view(n, self.kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            x = x + adapted_linear(attend(i, q, k, v), wo[0], wo[1], "none", lora, i, "self_attn.o_proj")
            h = _rms_norm(x, ln2, self.eps)
            g = adapted_linear(h, gate[0], gate[1], "silu", lora, i, "mlp.gate_proj")
            h = g * adapted_linear(h, up[0], up[1], "none", lora, i, "mlp.up_proj")
            x = x + adapted_linear(h, down[0], down[1], "none", lora, i, "mlp.down_proj")
        return _rms_norm(x, self.norm, self.eps)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head, None)
