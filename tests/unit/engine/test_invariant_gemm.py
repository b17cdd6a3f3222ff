"""The invariant fp32 GEMM kernel (app/engine/models/invariant_gemm.py, issue 21): a row's bits are
the same for every row count and position, both of the kernel's loop orders agree, the results are
a correct GEMM, and wrapping a model re-lays its weights out in place (no second copy)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine.models import compact_model, invariant_gemm
from app.engine.models.base import gemm_weight, linear, row_multiple
from app.engine.models.invariant_gemm import InputMajorWeight, input_major

ROOT = Path(__file__).resolve().parents[3]
AVX512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
pytestmark = pytest.mark.skipif(not AVX512, reason="the invariant kernel is AVX-512 only (oneDNN padding elsewhere)")

# (in, out): GPT-2-124M's qkv, MLP down-projection (K > 1024, where oneDNN's lone row differed),
# a head-like width not a multiple of 64, and odd small shapes (masked tails, K not a multiple of 4).
SHAPES = [(768, 2304), (3072, 768), (768, 5011), (7, 33), (1030, 100)]


def _weight(in_features: int, out_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(in_features, out_features, generator=g) * 0.02  # [in, out]


def test_the_kernel_builds_on_an_avx512_cpu() -> None:
    assert invariant_gemm.kernel() is not None
    assert (invariant_gemm.build_directory() / "textgen.stamp").exists()


def _kernel_in_a_process_without_a_compiler(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from app.engine.models import invariant_gemm as g\n"
        "print('KERNEL', g.kernel() is not None)\n"
    )
    # PATH names nothing: no g++, no ninja, as in the container's runtime image.
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env, "PATH": "/nonexistent"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_process_without_a_compiler_loads_the_module_built_for_these_sources(tmp_path: Path) -> None:
    """The container's runtime image has no compiler: it imports the module its build stage made,
    found by the stamp of its sources; a stale or missing one means the library fallbacks, said once."""
    assert invariant_gemm.kernel() is not None  # built (and stamped) in the default directory
    directory = invariant_gemm.build_directory()
    root = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    run = _kernel_in_a_process_without_a_compiler({"TORCH_EXTENSIONS_DIR": root} if root else {})
    assert "KERNEL True" in run.stdout, run.stderr[-2000:]
    # A copy of the build with another stamp (other sources): not loaded, and the build cannot run.
    copy = tmp_path / "textgen_kernels" / directory.name
    copy.mkdir(parents=True)
    shutil.copy(directory / "textgen_invariant_gemm.so", copy / "textgen_invariant_gemm.so")
    (copy / "textgen.stamp").write_text("0" * 64 + "\n")
    run = _kernel_in_a_process_without_a_compiler({"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert "KERNEL False" in run.stdout, run.stderr[-2000:]
    assert "CPU kernels did not build" in run.stderr and "install g++ and ninja" in run.stderr
    # With the stamp of these sources the same copy loads.
    (copy / "textgen.stamp").write_text((directory / "textgen.stamp").read_text())
    run = _kernel_in_a_process_without_a_compiler({"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert "KERNEL True" in run.stdout, run.stderr[-2000:]


def test_a_build_lock_left_by_a_killed_build_is_broken_and_a_fresh_one_kept(tmp_path: Path) -> None:
    """torch's builder waits without a bound for the lock of a build killed midway: every later start
    would hang. A lock older than any build is removed; a recent one (a build running) is kept."""
    lock = tmp_path / "lock"
    lock.touch()
    invariant_gemm._break_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - 20 * 60
    os.utime(lock, (old, old))
    invariant_gemm._break_stale_lock(tmp_path)
    assert not lock.exists()


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@torch.inference_mode()
def test_a_row_has_the_same_bits_for_every_row_count_and_position(
    in_features: int, out_features: int, bias: bool
) -> None:
    weight = InputMajorWeight(_weight(in_features, out_features))
    b = torch.randn(out_features, generator=torch.Generator().manual_seed(3)) if bias else None
    x = torch.randn(72, in_features, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([weight.matmul(x[r : r + 1], b) for r in range(72)])
    for m in (*range(2, 14), 31, 32, 33, 64, 70, 72):  # both loop orders (< 4 rows and >= 4), 6-row tails
        for start in (0, 72 - m, (72 - m) // 2):
            out = weight.matmul(x[start : start + m].clone(), b)
            assert torch.equal(out, alone[start : start + m]), f"{m} rows from {start}: a row's bits changed"
    expected = x.double() @ weight.data.double() + (b.double() if b is not None else 0)
    torch.testing.assert_close(alone.double(), expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_prefill_sized_batches_keep_a_rows_bits() -> None:
    weight = InputMajorWeight(_weight(3072, 768))
    x = torch.randn(1100, 3072, generator=torch.Generator().manual_seed(2))
    sampled = list(range(0, 1100, 37))
    alone = torch.cat([weight.matmul(x[r : r + 1], None) for r in sampled])
    for m in (65, 257, 1100):
        rows = [r for r in sampled if r < m]
        assert torch.equal(weight.matmul(x[:m], None)[rows], alone[: len(rows)]), f"{m} rows"


@torch.inference_mode()
def test_linear_runs_the_kernel_with_the_activation_and_needs_no_padding() -> None:
    param = torch.nn.Parameter(_weight(768, 3072).t().contiguous(), requires_grad=False)  # [out, in]
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(torch.ones(3, 768), param), approximate="tanh")
    weight = gemm_weight(param, stored_out_in=True)
    assert isinstance(weight, InputMajorWeight) and row_multiple(weight) == 1
    out = linear(torch.ones(3, 768), weight, None, "gelu_tanh")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_re_laying_out_a_weight_keeps_one_copy_and_the_parameters_values() -> None:
    out_in = _weight(64, 48).t().contiguous()  # an nn.Linear weight [out, in]
    param = torch.nn.Parameter(out_in.clone(), requires_grad=False)
    weight = input_major(param, stored_out_in=True)
    assert param.data_ptr() == weight.data.data_ptr()  # the parameter is a view of the new storage
    assert torch.equal(param, out_in) and param.shape == (48, 64)
    conv1d = torch.nn.Parameter(_weight(64, 48), requires_grad=False)  # GPT-2 Conv1D [in, out]: as it is
    before = conv1d.data_ptr()
    assert input_major(conv1d, stored_out_in=False).data.data_ptr() == before == conv1d.data_ptr()


@torch.inference_mode()
def test_a_wrapped_gpt2_runs_every_gemm_on_the_kernel_and_hf_still_agrees(tiny_gpt2_dir: "object") -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 2, 7]])
    before = model(ids).logits
    compact = compact_model(model)
    assert compact is not None and compact.row_multiple == 1
    assert isinstance(compact.lm_head, InputMajorWeight)
    # the tied embedding and the head share one (re-laid-out) storage
    assert compact.lm_head.data.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model(ids).logits, before)  # HF's forward reads the re-laid-out weights
    invariant_gemm.use(False)
    try:
        onednn = compact_model(model)
    finally:
        invariant_gemm.use(True)
    assert onednn is not None and onednn.row_multiple == 2
    torch.testing.assert_close(model(ids).logits, before)
