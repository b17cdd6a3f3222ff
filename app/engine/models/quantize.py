"""Quantized linear layers of a causal LM (TEXTGEN_QUANTIZE).

Modes (names as TGI's `--quantize` and torchao's configs):
- `int8-weight-only`: weights int8 per output channel (symmetric, as llama.cpp's q8_0 but one scale
  per row instead of per 32 values), the LM head included.
- `int4-weight-only`: weights int4 in groups of 32 values along the input (asymmetric: a scale and
  zero per group, rounded to bf16, as torchao's int4 weight-only and close to llama.cpp's q4_0). The
  LM head is int8 (llama.cpp likewise keeps its output matrix above 4 bits), and so is a layer
  whose shape int4 packing does not take (out features a multiple of 16, in features of 32).
- `int8-dynamic`: torchao's int8 weights per output channel with activations quantized to int8 per
  token at run time, integer GEMM (`torch._int_mm`, exact int32 sums) rescaled per row and column;
  LM head and embeddings kept in the model's dtype.

The weight-only GEMMs run our AVX-512 + VNNI kernels (quantized_gemm.cpp, built with
invariant_gemm.py's extension), bias and activation fused per output: each activation row is rounded
to 16-bit integers per group of 32 inputs (relative error below 2^-16 of the group's largest input;
aten's kernels round activations to bf16, 2^-9 of each value), the weights multiply them in exact
integer dot products (`vpdpwssd`), then fp32 scaling and sums. Why our own: PyTorch's
`aten._weight_int8pack_mm` reached 12 GB/s of weights on GPT-2's LM head at 1 row against ours 40-45
(it streams the rows without prefetching) and was slower at 32 rows too; the int4 kernel with fp32
activations was compute-bound (16 GB/s of weights in the decode step), the integer form is about 2x
faster at 1 and at 32 rows (docs/performance.md, "Weight-only kernels"). Where the extension does not
build (no compiler, no AVX-512) or the CPU lacks AVX512-VNNI, layers are packed for those aten
kernels instead (bf16 activations); the choice is made when a layer is packed (`PackedWeight.kernel`).

Both kernels compute every output value from its own row and column alone, in a fixed order over the
input (no split of the reduction by row count), so a row's result is bitwise the same for every row
count and position: these modes are batch-invariant without padding (tested,
tests/unit/engine/test_quantize.py). A layer stays in the model's dtype where the aten int8 kernel
could not run it (in features not a multiple of 16), so the layers quantized do not depend on
whether our kernel built. The embeddings stay in the model's dtype (GPT-2 ties them to the LM head:
the int8 head is an extra 1/4-size copy).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from app.engine.models import invariant_gemm
from app.engine.models.activations import ACTIVATIONS, KERNEL_ACTIVATIONS

Quantize = Literal["none", "int8-weight-only", "int4-weight-only", "int8-dynamic"]
WEIGHT_ONLY = ("int8-weight-only", "int4-weight-only")
INT4_GROUP = 32  # values per int4 scale/zero pair, as llama.cpp's q4_0 blocks


class QuantizeUnavailable(RuntimeError):
    """torchao is not installed; the message says how to install it."""


@dataclass(eq=False)
class PackedWeight:
    """A linear layer's weight [out, in] packed for a weight-only kernel; `matmul` is the GEMM.

    kernel "textgen" (ours, quantized_gemm.cpp):
      int8: `data` int8 [out, in rounded up to 32] in blocks of 16 groups of 32 (`_int8_blocks`),
      `scales` fp32 [out] (weight = q * scale);
      int4: `data` uint8 [out, in / 2], levels q in 0..15 two per byte in blocks of 16 groups
      (`_int4_blocks`); `scales` bf16 [out, 2, in / 32]: each group's scale, then
      its zero, with weight = (q - 8) * scale + zero.
    kernel "aten" (PyTorch's, where ours does not build or the CPU lacks VNNI):
      int8: `data` int8 [out, in] as quantized (no blocks), `scales` bf16 [out];
      int4: `data` as `_convert_weight_to_int4pack_for_cpu` lays it out, `scales` bf16
      [in / 32, out, 2] of (scale, zero) with weight = (q - 8) * scale + zero."""

    kind: Literal["int8", "int4"]
    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int
    kernel: Literal["textgen", "aten"] = "textgen"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dim(self) -> int:
        return 2

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
        """activation(x @ weight.T + bias): x [N, in] (any float dtype) -> [N, out] in x's dtype;
        each row's bits are independent of N. activation: "none", "silu", "gelu_tanh" or "gelu".

        Ours: fp32 inputs and sums, the activation fused per element. aten: bf16 inputs, fp32 sums
        rounded to bf16, bias and activation applied after."""
        if self.kernel == "aten":
            out = self._aten_matmul(x)
            return ACTIVATIONS[activation](out + bias if bias is not None else out)
        # Conversions only where needed: ~50 GEMMs a step, and a no-op .float() still costs a dispatch.
        a = x if x.dtype == torch.float32 else x.float()
        b = bias if bias is None or bias.dtype == torch.float32 else bias.float()
        act = KERNEL_ACTIVATIONS[activation]
        if torch.compiler.is_compiling():
            out = weight_only_linear_op(a, self.data, self.scales, b, act)
        else:
            out = _kernel_call(a, self.data, self.scales, b, act)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] fp32 as the kernel multiplies by it (aten int4: through its GEMM
        on an identity, so rounded to bf16)."""
        if self.kind == "int8" and self.kernel == "aten":
            return self.data.float() * self.scales.float()[:, None]
        if self.kind == "int8":
            q = _int8_values(self.data, self.in_features)
            return q.float() * self.scales.float()[:, None]
        if self.kernel == "aten":
            return self._aten_matmul(torch.eye(self.in_features)).float().t()
        q = _int4_levels(self.data, self.in_features // INT4_GROUP).float()
        scale, zero = self.scales[:, 0, :, None].float(), self.scales[:, 1, :, None].float()
        return ((q - 8) * scale + zero).view(self.out_features, self.in_features)

    def _aten_matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = x.to(torch.bfloat16)
        # Both kernels load activations with aligned AVX-512 loads: a view at an odd offset would crash.
        if a is x and (a.data_ptr() % 64 or not a.is_contiguous()):
            a = a.clone(memory_format=torch.contiguous_format)
        if self.kind == "int8":
            out = torch.ops.aten._weight_int8pack_mm(a, self.data, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.data, INT4_GROUP, self.scales)
        return out.to(x.dtype)


def _kernel_call(
    x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, act: int
) -> torch.Tensor:
    module = invariant_gemm.kernel()
    assert module is not None, "packed for our kernel, which no longer loads"
    if data.dtype == torch.int8:
        return module.int8_linear(x, data, scales, bias, act)
    return module.int4_linear(x, data, scales, bias, act)


def _int8_blocks(q: torch.Tensor) -> torch.Tensor:
    """int8 q [out, in] -> the kernel's bytes [out, in rounded up to 32] (zero padded): blocks of 16
    groups of 32 (the last holds the rest, W), each 16 steps of 2W bytes, byte 2j + e of step t
    holding group j's k = 2t + e; a last block of exactly 8 groups folded into 8 steps of 32 bytes
    (quantized_gemm.cpp, Acts and Int8Rows)."""
    out, k = q.shape
    groups = torch.nn.functional.pad(q, (0, -k % INT4_GROUP)).view(out, -1, INT4_GROUP)
    return _blocks(groups, lambda g: g.view(out, -1, 16, 2), lambda g: g.view(out, 8, 2, 8, 2))


def _int4_blocks(q: torch.Tensor) -> torch.Tensor:
    """Levels q [out, groups, 32] (uint8, 0..15) -> the kernel's bytes [out, groups * 16]: blocks of
    16 groups (the last holds the rest, W), each 8 chunks of 2W bytes, byte 2j + e of chunk c holding
    group j's k = 4c + e (low nibble) and 4c + 2 + e (high nibble); a last block of exactly 8 groups
    folded into 4 chunks of 32 bytes (quantized_gemm.cpp, Int4Rows)."""

    def nibbles(g: torch.Tensor) -> torch.Tensor:  # [..., high?, e] -> bytes [..., e]
        return g[..., 0, :] | (g[..., 1, :] << 4)

    out = q.shape[0]
    return _blocks(q, lambda g: nibbles(g.view(out, -1, 8, 2, 2)), lambda g: nibbles(g.view(out, 8, 2, 4, 2, 2)))


def _blocks(
    groups: torch.Tensor,
    plain: Callable[[torch.Tensor], torch.Tensor],
    folded: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Groups [out, G, 32] -> bytes by blocks of 16 groups. `plain(block)` views a block as
    [out, W, step, e]; `folded(block)` the last 8 as [out, 8, half, step, e] (lanes j and j + 8)."""
    out, count, _ = groups.shape
    blocks = []
    for first in range(0, count, 16):
        block = groups[:, first : first + 16]
        if block.shape[1] == 8:
            blocks.append(folded(block).permute(0, 3, 2, 1, 4).reshape(out, -1))  # [out, step, half, j, e]
        else:
            blocks.append(plain(block).permute(0, 2, 1, 3).reshape(out, -1))  # [out, step, j, e]
    return torch.cat(blocks, dim=1).contiguous()


def _unblock(data: torch.Tensor, count: int, bytes_per_group: int, steps: int) -> torch.Tensor:
    """The inverse of `_blocks`' permutations: bytes [out, count * bytes_per_group] ->
    [out, count, steps, e] (steps of the unfolded layout, k-major within a group)."""
    out = data.shape[0]
    parts = []
    for first in range(0, count, 16):
        width = min(16, count - first)
        block = data[:, first * bytes_per_group : (first + width) * bytes_per_group]
        if width == 8:  # [out, step, half, j, e] -> [out, j, half, step, e] -> [out, j, 2 * step, e]
            parts.append(block.reshape(out, steps // 2, 2, 8, 2).permute(0, 3, 2, 1, 4).reshape(out, 8, steps, 2))
        else:
            parts.append(block.reshape(out, steps, width, 2).permute(0, 2, 1, 3))
    return torch.cat(parts, dim=1)


def _int8_values(data: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of `_int8_blocks`: the kernel's bytes -> q [out, in]."""
    out = data.shape[0]
    return _unblock(data, data.shape[1] // INT4_GROUP, INT4_GROUP, 16).reshape(out, -1)[:, :in_features]


def _int4_levels(data: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_int4_blocks`: [out, groups * 16] bytes -> levels [out, groups, 32]."""
    out = data.shape[0]
    chunks = _unblock(data, groups, 16, 8)  # [out, groups, chunk, e]: k = 4 chunk + e and + 2
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=3).reshape(out, groups, INT4_GROUP)


def _ours() -> bool:
    """Whether layers packed now go to our kernels: they build here, `invariant_gemm.use(False)` was
    not called, and the CPU has AVX512-VNNI (their integer dot products)."""
    return invariant_gemm.enabled() and torch.cpu._is_vnni_supported()


def pack_int8(weight: torch.Tensor) -> PackedWeight | None:
    """`weight` [out, in] (float) as int8 per output channel; None when the kernel cannot run it."""
    out_features, in_features = weight.shape
    if weight.device.type != "cpu" or in_features % 16:
        return None
    w = weight.detach().float()
    # The scale is rounded to bf16 (what the aten kernel multiplies by), so quantize against it;
    # rounding amax/127 up by one bf16 step first keeps every |w / scale| within 127 (no clipping).
    scale = (w.abs().amax(dim=1) / 127 * (1 + 2**-7)).clamp(min=2**-100).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    if _ours():
        return PackedWeight("int8", _int8_blocks(q), scale.float().contiguous(), out_features, in_features)
    return PackedWeight("int8", q, scale.contiguous(), out_features, in_features, "aten")


def pack_int4(weight: torch.Tensor) -> PackedWeight | None:
    """`weight` [out, in] (float) as int4 in groups of INT4_GROUP inputs; None when its shape or
    device does not fit the kernel."""
    out_features, in_features = weight.shape
    if weight.device.type != "cpu" or out_features % 16 or in_features % INT4_GROUP:
        return None
    groups = in_features // INT4_GROUP
    w = weight.detach().float().view(out_features, groups, INT4_GROUP)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15 * (1 + 2**-7)).clamp(min=2**-100).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)  # the value of q = 8
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15).to(torch.uint8)
    if _ours():
        data = _int4_blocks(q.view(out_features, groups, INT4_GROUP))
        scales = torch.stack([scale, zero], dim=1).contiguous()  # [out, 2, groups] bf16
        return PackedWeight("int4", data, scales, out_features, in_features)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_features, in_features).to(torch.int32), 1)
    scales = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # [groups, out, 2]
    return PackedWeight("int4", packed, scales, out_features, in_features, "aten")


class QuantizedLinear(nn.Module):
    """`nn.Linear` over a `PackedWeight` (`weight`), for the transformers forward; the compact
    forward reads `weight` and `bias` and calls the same kernel."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        # Buffers, so .to(), state inspection and the checkpoint-page accounting see the packed data.
        self.register_buffer("packed_data", weight.data, persistent=False)
        self.register_buffer("packed_scales", weight.scales, persistent=False)
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.matmul(x.reshape(-1, self.in_features), self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.kind}"


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
        _replace(model, name, linear)
        replaced += 1
    return replaced


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: PreTrainedModel, mode: Quantize) -> int:
    """Quantize `model`'s linear layers in place (the LM head too in the weight-only modes, see the
    module docstring); returns how many were quantized.

    Raises QuantizeUnavailable when int8-dynamic's torchao is missing."""
    if mode == "none":
        return 0
    if mode in WEIGHT_ONLY:
        return _weight_only(model, mode)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as exc:
        raise QuantizeUnavailable(
            f"TEXTGEN_QUANTIZE={mode} needs torchao: pip install 'textgen-service[quantize]' (torchao 0.18)."
        ) from exc
    conv1d_to_linear(model)
    head = model.get_output_embeddings()
    targets = {id(m) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}

    def keep(module: nn.Module, _name: str) -> bool:
        return id(module) in targets

    with torch.no_grad():
        # set_inductor_config=False: we run eagerly, and torchao would otherwise change inductor's globals.
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), filter_fn=keep)
    return len(targets)


def _weight_only(model: PreTrainedModel, mode: Quantize) -> int:
    if model.device.type != "cpu":
        raise QuantizeUnavailable(
            f"TEXTGEN_QUANTIZE={mode} runs PyTorch's CPU weight-only kernels; on {model.device.type} use "
            "TEXTGEN_QUANTIZE=int8-dynamic or TEXTGEN_DTYPE=bfloat16."
        )
    conv1d_to_linear(model)
    head = model.get_output_embeddings()
    quantized = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            packed = pack_int4(module.weight) if mode == "int4-weight-only" and module is not head else None
            packed = packed or pack_int8(module.weight)
            if packed is None:
                continue
            _replace(model, name, QuantizedLinear(packed, module.bias))
            quantized += 1
    return quantized


def is_dynamic_int8(weight: object) -> bool:
    """Whether `weight` is a torchao int8 weight whose activations are quantized per token at run time."""
    return getattr(weight, "act_quant_kwargs", None) is not None and getattr(weight, "qdata", None) is not None


@torch.library.custom_op("textgen::weight_only_linear", mutates_args=())
def weight_only_linear_op(
    x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, activation: int
) -> torch.Tensor:
    """Our weight-only kernels as an opaque op for torch.compile (TEXTGEN_COMPILE)."""
    return _kernel_call(x, data, scales, bias, activation)


@weight_only_linear_op.register_fake
def _(
    x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, activation: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], data.shape[0]))
