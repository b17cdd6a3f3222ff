"""int8 quantization of a causal LM's linear layers through torchao (TEXTGEN_QUANTIZE).

Modes (names as TGI's `--quantize` and torchao's configs):
- `int8-weight-only`: weights int8 per output channel, activations stay float; torchao's eager CPU
  kernel converts the int8 weight to float on every call (its fast path is torch.compile's), so this
  is a memory mode, slower than fp32 here (README, "Performance, precision and batch invariance").
- `int8-dynamic`: weights int8 per output channel, activations quantized to int8 per token at run
  time, integer GEMM (`torch._int_mm`, exact int32 sums) rescaled per row and column.

The LM head and the embeddings stay in the model's dtype, as transformers' `TorchAoConfig` does by
default: GPT-2 ties the head to the embeddings, so an int8 head would add a copy rather than save
one, and the logits keep the head's precision. GPT-2's `Conv1D` layers ([in, out] weights) become
`nn.Linear` first, since torchao quantizes `nn.Linear` only.
"""

from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

Quantize = Literal["none", "int8-weight-only", "int8-dynamic"]


class QuantizeUnavailable(RuntimeError):
    """torchao is not installed; the message says how to install it."""


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` in `model` with an equivalent `nn.Linear` (weight [out, in]).

    Returns how many were replaced. The old [in, out] storage is released as the module goes."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        weight = module.weight.detach()  # [in, out]
        linear = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    return replaced


def quantize_model(model: PreTrainedModel, mode: Quantize) -> int:
    """Quantize `model`'s linear layers except the LM head in place; returns how many were quantized.

    Raises QuantizeUnavailable when torchao is missing."""
    if mode == "none":
        return 0
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as exc:
        raise QuantizeUnavailable(
            f"TEXTGEN_QUANTIZE={mode} needs torchao: pip install 'textgen-service[quantize]' (torchao 0.18)."
        ) from exc
    # set_inductor_config=False: we run eagerly, and torchao would otherwise change inductor's globals.
    config = (
        Int8WeightOnlyConfig(set_inductor_config=False)
        if mode == "int8-weight-only"
        else Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    )
    conv1d_to_linear(model)
    head = model.get_output_embeddings()
    targets = {id(m) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}

    def keep(module: nn.Module, _name: str) -> bool:
        return id(module) in targets

    with torch.no_grad():
        quantize_(model, config, filter_fn=keep)
    return len(targets)


def is_dynamic_int8(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao int8 weight whose activations are quantized per token at run time."""
    return getattr(weight, "act_quant_kwargs", None) is not None and getattr(weight, "qdata", None) is not None
