"""TEXTGEN_QUANTIZE's weight-only kernels and the batch invariance each precision mode claims.

Kernel level: a row's output is bitwise the same for every row count 1..64 and every position
(GPT-2-124M's layer shapes). Engine level (issue 21): 32 prompts submitted together give the ids and
logprobs of each prompt run alone, in every mode the loader calls batch-invariant, on a GPT-2 wide
enough (384, MLP 1536) that oneDNN's bf16 single-row kernel differs from its batched one.
"""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from app.engine.core.types import SamplingParams
from app.engine.load.loader import load_model
from app.engine.models import invariant_gemm
from app.engine.models.activations import ACTIVATIONS
from app.engine.models.base import linear, pad_rows, row_multiple
from app.engine.models.quantize import INT4_GROUP, PackedWeight, _int4_blocks, _int8_blocks, pack_int4, pack_int8
from tests.unit.engine.test_compact import forward_options, run_engine

# (in, out): GPT-2-124M's qkv, MLP up and down projections, and a head-like wide output.
SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 5008)]


def _weight(in_features: int, out_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.02


def _assert_close_to_dequantized(
    out: torch.Tensor, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor, act: str = "none"
) -> None:
    """`out` equals act(x @ w.T + bias) for the dequantized weight w, up to the kernels' rounding of
    each activation to 16 bits per group of 32 (|error| <= max|x_group| / 65534 per input) and fp32
    sums."""
    w = packed.dequantize().double()
    expected = ACTIVATIONS[act](x.double() @ w.t() + bias.double())
    k = x.shape[1]
    padded = torch.nn.functional.pad(x.abs().double(), (0, -k % INT4_GROUP)).view(x.shape[0], -1, INT4_GROUP)
    group_max = padded.amax(-1, keepdim=True).expand_as(padded).reshape(x.shape[0], -1)[:, :k]
    # Every activation function here has a slope within [-0.2, 1.2].
    bound = 1.2 * (group_max / 65534) @ w.abs().t() + 1e-5 * expected.abs() + 1e-6
    assert ((out.double() - expected).abs() <= bound).all(), (out.double() - expected).abs().max()


def _assert_rows_invariant(gemm: "callable", in_features: int, dtype: torch.dtype, rows: int = 64) -> None:  # type: ignore[valid-type]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    alone = torch.cat([gemm(x[r : r + 1]) for r in range(rows)])
    for m in range(2, rows + 1):
        for start in (0, rows - m):  # the same rows at the front and at the back of the tensor
            out = gemm(x[start : start + m].clone())
            assert torch.equal(out, alone[start : start + m]), f"{m} rows from {start}: a row's bits changed"


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_weight_only_kernels_give_a_row_the_same_bits_for_every_row_count(
    kind: str, in_features: int, out_features: int, dtype: torch.dtype
) -> None:
    packed = (pack_int8 if kind == "int8" else pack_int4)(_weight(in_features, out_features))
    assert packed is not None
    assert row_multiple(packed) == 1
    _assert_rows_invariant(packed.matmul, in_features, dtype)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.inference_mode()
def test_weight_only_kernels_keep_a_rows_bits_in_prefill_sized_batches(kind: str) -> None:
    """Prefill packs every prompt token of a step into one GEMM: hundreds of rows."""
    packed = (pack_int8 if kind == "int8" else pack_int4)(_weight(3072, 768))
    assert packed is not None
    x = torch.randn(1100, 3072, generator=torch.Generator().manual_seed(2))
    sampled = list(range(0, 1100, 37))
    alone = torch.cat([packed.matmul(x[r : r + 1]) for r in sampled])
    for m in (65, 128, 129, 257, 513, 1100):
        rows = [r for r in sampled if r < m]
        assert torch.equal(packed.matmul(x[:m])[rows], alone[: len(rows)]), f"{m} rows"


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("activation", ["none", "silu", "gelu_tanh", "gelu"])
@torch.inference_mode()
def test_weight_only_kernels_fuse_bias_and_activation_per_element(kind: str, activation: str) -> None:
    """Our kernels (quantized_gemm.cpp) apply bias and activation per output: rows stay invariant
    on a 172-wide output (stories260k's MLP; 176 for int4, whose packing needs a multiple of 16),
    where torch's vectorized SiLU and tanh-GELU give a row's tail other bits alone than batched, and
    the values are the dequantized weight's."""
    assert invariant_gemm.kernel() is not None, "the kernel did not build here"
    out = 172 if kind == "int8" else 176
    packed = (pack_int8 if kind == "int8" else pack_int4)(_weight(64, out))
    assert packed is not None and packed.kernel == "textgen"
    bias = torch.randn(out, generator=torch.Generator().manual_seed(3))
    _assert_rows_invariant(lambda x: packed.matmul(x, bias, activation), 64, torch.float32, rows=24)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4))
    _assert_close_to_dequantized(packed.matmul(x, bias, activation), x, packed, bias, activation)


@torch.inference_mode()
def test_weight_only_kernels_take_any_width() -> None:
    """int8: input widths that are not a multiple of 32 (zero padded to the last group); both: 1..7
    outputs, a last block of fewer than 16 groups, and every row count 1..9 (tiles of 1-4 rows)."""
    assert invariant_gemm.kernel() is not None
    g = torch.Generator().manual_seed(5)
    for k, n in [(37, 7), (16, 1), (5, 13), (100, 6), (64, 5), (96, 3), (544, 5), (1040, 2)]:
        x = torch.randn(9, k, generator=g)
        bias = torch.randn(n, generator=g)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        weights = [PackedWeight("int8", _int8_blocks(q), torch.rand(n, generator=g) + 0.5, n, k)]
        if k % INT4_GROUP == 0:
            q4 = _int4_blocks(torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), dtype=torch.uint8, generator=g))
            scales = (torch.rand(n, 2, k // INT4_GROUP, generator=g) - 0.5).to(torch.bfloat16)
            weights.append(PackedWeight("int4", q4, scales, n, k))
        for packed in weights:
            assert packed.dequantize().shape == (n, k)
            for m in range(1, 10):
                out = packed.matmul(x[:m].clone(), bias)
                _assert_close_to_dequantized(out, x[:m], packed, bias)
                assert torch.equal(out[-1], packed.matmul(x[m - 1 : m].clone(), bias)[0])


@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.inference_mode()
def test_weight_only_falls_back_to_pytorchs_kernels_invariantly(kind: str) -> None:
    """Where our kernels do not build, layers are packed for aten's (bf16 activations): rows still
    invariant, and within bf16 rounding of ours."""
    weight = _weight(768, 2304)
    ours = (pack_int8 if kind == "int8" else pack_int4)(weight)
    invariant_gemm.use(False)
    try:
        theirs = (pack_int8 if kind == "int8" else pack_int4)(weight)
    finally:
        invariant_gemm.use(True)
    assert ours is not None and theirs is not None and (ours.kernel, theirs.kernel) == ("textgen", "aten")
    _assert_rows_invariant(theirs.matmul, 768, torch.float32, rows=12)
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(theirs.matmul(x), ours.matmul(x), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_onednn_rows_padded_to_the_row_multiple_are_invariant(dtype: torch.dtype) -> None:
    """bf16 at K = 3072 (GPT-2-124M's MLP down-projection): a lone row took another kernel than
    2+ rows (issue 21's bf16 finding), so bf16 pads to 2 rows as fp32 does."""
    weight = _weight(3072, 768).to(dtype)
    assert row_multiple(weight) == 2

    def gemm(x: torch.Tensor) -> torch.Tensor:
        # What the compact forward does: pad to the row multiple, drop the padding.
        return linear(pad_rows(x, row_multiple(weight)), weight, None)[: x.shape[0]]

    _assert_rows_invariant(gemm, 3072, dtype, rows=40)


@pytest.mark.parametrize("kernel", ["textgen", "aten"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packing_rounds_each_weight_to_its_nearest_level(kind: str, kernel: str) -> None:
    weight = _weight(256, 64)
    invariant_gemm.use(kernel == "textgen")
    try:
        packed = (pack_int8 if kind == "int8" else pack_int4)(weight)
    finally:
        invariant_gemm.use(True)
    assert packed is not None and packed.shape == weight.shape and packed.kernel == kernel
    dequantized = packed.dequantize()
    # The weight as the kernel sees it: what its GEMM gives on an identity (aten: rounded to bf16).
    through_gemm = packed.matmul(torch.eye(256)).t()
    rounding = 2**-8 if kernel == "aten" else 1e-6
    assert ((through_gemm - dequantized).abs() <= dequantized.abs() * rounding + 1e-7).all()
    if kind == "int8":
        step = packed.scales.float()[:, None]
    else:  # a group's levels are `step` apart: the largest gap between its distinct dequantized values
        grouped = dequantized.view(64, -1, INT4_GROUP)
        step = (grouped.amax(-1) - grouped.amin(-1)).repeat_interleave(INT4_GROUP, dim=1) / 15
    # Half a quantization step, plus the bf16 rounding of the aten kernel's output and of int4's zero.
    bound = step / 2 + (dequantized.abs() + weight.abs()) * 2**-8 + 1e-6
    assert ((dequantized - weight).abs() <= bound).all()


def test_shapes_the_kernels_cannot_run_stay_unpacked() -> None:
    assert pack_int8(_weight(100, 64)) is None  # in features not a multiple of 16
    assert pack_int4(_weight(64, 100)) is None  # out features not a multiple of 16
    assert pack_int4(_weight(48, 64)) is None  # in features not a multiple of the group
    assert isinstance(pack_int8(_weight(48, 64)), PackedWeight)


def test_weight_only_modes_are_refused_off_cpu(tiny_gpt2_dir: Path) -> None:
    from app.engine.models.quantize import QuantizeUnavailable, quantize_model

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).to("meta")
    with pytest.raises(QuantizeUnavailable, match="CPU weight-only kernels"):
        quantize_model(model, "int8-weight-only")


def build_mid_gpt2(path: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer GPT-2, 384 wide (MLP 1536: the smallest width where bf16's lone row differed),
    random weights, the tokenizer of `tokenizer_dir`; saved at `path`."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=384,
        n_layer=2,
        n_head=6,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mid_gpt2_dir(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mid_gpt2(tmp_path_factory.mktemp("mid-gpt2"), tiny_gpt2_dir)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dtype": "bfloat16", "kv_cache_dtype": "bfloat16"},
        {"quantize": "int8-weight-only"},
        {"quantize": "int4-weight-only"},
        {"quantize": "int8-dynamic"},
    ],
    ids=["float32", "bfloat16", "int8-weight-only", "int4-weight-only", "int8-dynamic"],
)
@torch.inference_mode()
def test_thirty_two_prompts_together_equal_each_alone(mid_gpt2_dir: Path, options: dict[str, object]) -> None:
    lm = load_model(str(mid_gpt2_dir), **options)  # type: ignore[arg-type]
    assert forward_options(lm).batch_invariant, lm.forward_description
    rng = random.Random(21)
    vocab = lm.model.config.vocab_size
    requests = [([rng.randrange(3, vocab) for _ in range(rng.randint(4, 31))], SamplingParams(), 6) for _ in range(32)]
    together = run_engine(lm, requests, [0.0] * len(requests))
    alone = run_engine(lm, requests, None)
    for i, (t, a) in enumerate(zip(together, alone, strict=True)):
        assert t[0] == a[0], f"prompt {i}: token ids differ"
        assert t[1] == a[1], f"prompt {i}: logprobs differ"


def test_cpus_without_vnni_get_pytorchs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our kernels multiply with AVX512-VNNI (`vpdpwssd`): a CPU with AVX-512 but without VNNI
    (Skylake-X) packs for aten's kernels instead of crashing on an illegal instruction."""
    weight = _weight(768, 256)
    assert pack_int8(weight).kernel == "textgen"  # type: ignore[union-attr]
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert pack_int8(weight).kernel == "aten"  # type: ignore[union-attr]
    assert pack_int4(weight).kernel == "aten"  # type: ignore[union-attr]
