"""What a compact forward provides to the batch: embeddings, decoder layers, the LM head.

Every GEMM goes through `linear`. fp32 weights (GPT-2's, Llama's) on an AVX-512 CPU run the invariant kernel
(`invariant_gemm`, weights stored [in, out]): a row's bits are the same for every row count, so
nothing is padded. Otherwise (bf16, no AVX-512, no compiler) `linear` calls oneDNN's matmul (the primitive PyTorch's
inductor uses for frozen linears) rather than MKL's, for two measured reasons (torch 2.13, 2 cores,
avx512; ../shared/notes and `python -m bench.step`):
- batch invariance: oneDNN gives a row the same bits for every row count >= 2 (tested to 3000
  rows, any position, 1 or 2 threads; fp32 and bf16, fused GELU/SiLU included), where MKL needs
  >= 4 rows and a different kernel takes 1-3;
- speed at few rows: MKL's 4-row path reads GPT-2's [50257, 768] LM head in 25 ms, oneDNN's 2-row
  path in 8 ms (32 rows: 35 ms against 18 ms).
"""

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from app.engine.models.activations import ACTIVATIONS, KERNEL_ACTIVATIONS
from app.engine.models.invariant_gemm import InputMajorWeight, input_major
from app.engine.models.invariant_gemm import enabled as invariant_gemm_enabled
from app.engine.models.invariant_gemm import kernel as invariant_gemm_kernel
from app.engine.models.quantize import PackedWeight, is_dynamic_int8

# attend(layer, q [N, heads, dim], k [N, kv_heads, dim], v [N, kv_heads, dim]) -> [N, heads * dim]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# A GEMM's weight: a plain tensor [out, in], one stored [in, out] for the invariant fp32 kernel, or
# one packed for a weight-only kernel (TEXTGEN_QUANTIZE).
Weight = torch.Tensor | InputMajorWeight | PackedWeight


def onednn_linear(weight: Weight) -> bool:
    """Whether `linear` runs `weight` through oneDNN: a plain fp32/bf16 CPU tensor, [out, in] contiguous."""
    return (
        _ONEDNN
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a quantized tensor subclass
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.is_contiguous()
    )


def row_multiple(weight: Weight) -> int:
    """The row count every GEMM over `weight` is padded to a multiple of, for batch invariance.

    oneDNN: a single row takes another kernel than 2+ rows, in fp32 (up to 5e-5 apart) and in bf16
    too once the input is 1536 wide or more (GPT-2-124M's MLP down-projection, K = 3072: 6 of 40
    rows differed in the last bit alone and batched; K <= 1024 never did; measured torch 2.13,
    issue 21), so both pad to 2 rows; the weight-only int8/int4 kernels (`PackedWeight`) and
    torchao's dynamic int8 (each row quantized on its own, int32 sums) give a row the same bits for
    any row count, and so does the invariant fp32 kernel (`InputMajorWeight`); MKL (any other CPU
    case) needs 4 rows (measured: 1 row and 2-3 rows differ from >= 4)."""
    if isinstance(weight, PackedWeight | InputMajorWeight) or is_dynamic_int8(weight):
        return 1
    if onednn_linear(weight):
        return 2
    return 4


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
    """`activation(x @ weight.T + bias)`: x [N, in], weight [out, in] -> [N, out].

    activation: "none", "gelu_tanh", "gelu" (erf) or "silu", fused into the GEMM by our CPU kernels
    and on oneDNN."""
    if isinstance(weight, InputMajorWeight):
        return weight.matmul(x, bias, activation)
    if isinstance(weight, PackedWeight):
        return weight.matmul(x, bias, activation)
    if onednn_linear(weight) and x.dtype == weight.dtype:
        if x.shape[0] == 1 and weight.dtype == torch.float32:
            # A lone fp32 row takes another oneDNN kernel than 2+ rows: pad it here, since the
            # model's row_multiple is 1 when its own GEMMs run the invariant kernel (a LoRA
            # adapter's A and B stay plain tensors).
            return linear(torch.cat([x, x.new_zeros(x.shape)]), weight, bias, activation)[:1]
        kind, algorithm = _ONEDNN_ACTIVATIONS[activation]
        if torch.compiler.is_compiling():  # TEXTGEN_COMPILE: the same kernel, opaque to inductor
            return onednn_linear_op(x, weight, bias, kind, algorithm)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, kind, [], algorithm)
    return activate(F.linear(x, weight, bias), activation)


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """`activation` of x [N, width] per element. fp32 on CPU runs our kernels' activation (an
    element's bits depend on its value alone): PyTorch's vectorized SiLU and tanh-GELU give the
    elements of a tensor's vector tail other bits, so a row's values changed with the row count
    (stories260k's 172-wide MLP under int8-dynamic, once its fp32 GEMMs needed no padding)."""
    if activation == "none":
        return x
    if x.dtype == torch.float32 and x.dim() == 2 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        module = invariant_gemm_kernel()
        if module is not None:
            return module.activation(x, KERNEL_ACTIVATIONS[activation])
    return ACTIVATIONS[activation](x)


@torch.library.custom_op("textgen::onednn_linear", mutates_args=())
def onednn_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, algorithm: str
) -> torch.Tensor:
    """oneDNN's linear as an opaque op for torch.compile: inductor's lowering of
    mkldnn._linear_pointwise expects its own pre-packed weights (it fails on plain ones), and
    calling the kernel as it is keeps a row's bits those of the eager forward's GEMMs."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, kind, [], algorithm)


@onednn_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, algorithm: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


_ONEDNN_ACTIVATIONS = {
    "none": ("none", ""),
    "gelu_tanh": ("gelu", "tanh"),
    "gelu": ("gelu", "none"),
    "silu": ("swish", ""),
}


class LoraDeltas(Protocol):
    """The LoRA deltas of one packed forward's token rows, as the forward applies them
    (`app.engine.models.lora.LoraRows`). A protocol here, not that class, so that the model interface does
    not import the adapter code that is built on its GEMMs (no import circle)."""

    def apply(
        self,
        layer: int,
        slot: str,
        x: torch.Tensor,
        weight: Weight,
        bias: torch.Tensor | None,
        activation: str,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """`out` (= activation(linear(x, weight, bias))) [N, out] with the adapted rows' deltas added."""
        ...


def adapted_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    activation: str,
    lora: LoraDeltas | None,
    layer: int,
    slot: str,
) -> torch.Tensor:
    """`linear(x, weight, bias, activation)` plus, on the rows of adapted requests, their LoRA delta."""
    out = linear(x, weight, bias, activation)
    return out if lora is None else lora.apply(layer, slot, x, weight, bias, activation, out)


class CompactModel:
    """A decoder-only LM as plain tensor code over flattened tokens [N, hidden].

    Every op is row-wise (norms, activations, residuals) or a GEMM over the rows (`linear`), so a
    token's result depends only on its own row as long as GEMMs see a row count that is a multiple
    of `row_multiple`. Attention is the caller's: it sees each sequence's own keys only.
    """

    family: str = ""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: torch.dtype
    row_multiple: int = 4  # see `row_multiple()`; set from the weights at wrap time
    device: torch.device

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, lora: LoraDeltas | None = None
    ) -> torch.Tensor:
        """ids, positions: [N] (N a multiple of row_multiple); `lora`: the rows' LoRA adapters, if
        any. Returns final hidden states [N, hidden]."""
        raise NotImplementedError

    def lora_targets(self) -> dict[str, tuple[int, str, int, int]]:
        """The layers a LoRA adapter may adapt: module path in the HF model (as in peft's tensor
        names) -> (layer index, slot in the block, out features, in features)."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] for hidden states [N, hidden] (N a multiple of row_multiple)."""
        raise NotImplementedError


def padded_rows(n: int, multiple: int) -> int:
    """The row count a GEMM over `n` rows runs with: n rounded up to a multiple of `multiple` (the
    runner's `ForwardOptions.row_multiple`: the model's `row_multiple` when batch invariant, else 1)."""
    return n + (-n) % multiple


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """`x` [N, width] with zero rows appended up to `padded_rows(N, multiple)`."""
    extra = padded_rows(x.shape[0], multiple) - x.shape[0]
    return torch.cat([x, x.new_zeros((extra, x.shape[1]))]) if extra else x


def head_weight(model: torch.nn.Module) -> Weight:
    """The LM head's weight [vocab, hidden] of an HF causal LM: packed when TEXTGEN_QUANTIZE replaced
    the head (`QuantizedLinear`), else as `gemm_weight` gives it."""
    weight = model.get_output_embeddings().weight  # type: ignore[operator]
    return weight if isinstance(weight, PackedWeight) else gemm_weight(weight, True)


def gemm_weight(param: torch.Tensor, stored_out_in: bool) -> Weight:
    """A plain (not quantized) linear weight as `linear` takes it, sharing the parameter's storage.

    stored_out_in: the parameter is [out, in] (nn.Linear, an LM head), else [in, out] (GPT-2's
    Conv1D). fp32 on CPU goes to the invariant kernel when it runs here (stored [in, out]); anything
    else is an [out, in] contiguous tensor (for oneDNN). Either way the parameter may be re-pointed
    at re-laid-out storage (same shape and values), so the transformers forward keeps working and
    no second copy is kept. A tied embedding so re-laid out is read by a strided gather."""
    if type(param.detach()) is not torch.Tensor:  # a tensor subclass (torchao's int8-dynamic weight)
        return param.detach()
    if param.dtype == torch.float32 and param.device.type == "cpu" and invariant_gemm_enabled():
        return input_major(param, stored_out_in)
    if stored_out_in:
        weight = param.detach()
        if not weight.is_contiguous():  # an earlier wrap stored it [in, out]
            weight = weight.contiguous()
            param.data = weight
        return weight
    return as_linear_weight(param)


def as_linear_weight(conv1d_weight: torch.Tensor) -> torch.Tensor:
    """An [out, in] contiguous tensor sharing storage with a GPT-2 `Conv1D` weight [in, out].

    The parameter is re-pointed at the transposed storage (a view with its old shape and values),
    so HF's forward still works and no second copy is kept."""
    out_in = conv1d_weight.detach().t()
    if not out_in.is_contiguous():
        out_in = out_in.contiguous()
        conv1d_weight.data = out_in.t()
    return out_in
