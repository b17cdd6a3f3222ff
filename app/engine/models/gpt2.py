"""GPT-2 as a compact forward: HF's weights read in place, HF's arithmetic (Conv1D is addmm)."""

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from app.engine.models.base import Attend, CompactModel, rowwise

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": None, "gelu": "none"}


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
        self.kv_dtype = self.dtype
        self.device = self.wte.device
        # Per block: (weight, bias) of ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj.
        self.blocks = [
            tuple(
                (weight(f"transformer.h.{i}.{name}.weight"), weight(f"transformer.h.{i}.{name}.bias"))
                for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
            )
            for i in range(config.n_layer)
        ]
        self.ln_f = (weight("transformer.ln_f.weight"), weight("transformer.ln_f.bias"))
        # MKL reads a [hidden, vocab] weight with one row of input about 1.6x faster than the
        # [vocab, hidden] layout nn.Linear keeps (../shared/notes/peers.md): keep a transposed copy.
        self.lm_head_t = model.lm_head.weight.detach().t().contiguous()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        n, width = x.shape
        for i, (ln1, qkv, proj, ln2, fc, out) in enumerate(self.blocks):
            h = F.layer_norm(x, (width,), ln1[0], ln1[1], self.eps)
            q, k, v = torch.addmm(qkv[1], h, qkv[0]).split(width, dim=1)
            a = attend(
                i,
                q.view(n, self.heads, self.head_dim),
                k.view(n, self.heads, self.head_dim),
                v.view(n, self.heads, self.head_dim),
            )
            x = x + torch.addmm(proj[1], a, proj[0])
            h = F.layer_norm(x, (width,), ln2[0], ln2[1], self.eps)
            h = rowwise(self._activation, torch.addmm(fc[1], h, fc[0]), self.batch_invariant)
            x = x + torch.addmm(out[1], h, out[0])
        return F.layer_norm(x, (width,), self.ln_f[0], self.ln_f[1], self.eps)

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.lm_head_t
