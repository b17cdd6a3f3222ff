"""The fp32 GEMM of the compact forward on CPU: a small AVX-512 kernel whose rows are bitwise the
same for every row count, so fp32 batches need no padding (issue 21).

Why a hand-written kernel (measured on the 2-core AMD EPYC Zen 4, torch 2.13, oneDNN 3.12, MKL
2024.2; numbers and method in docs/performance.md, "fp32 GEMM kernel"): every library path tried
gives a single row other bits than the same row in a batch, or reads the weights slower than the
kernel that does:
- oneDNN on plain [out, in] weights: 1 row runs an AVX2 dot-product kernel, 2+ rows the AVX-512
  brgemm (up to 5e-5 apart), so today's path pads every GEMM to 2 rows;
- oneDNN with the weight stored [in, out] or pre-packed (`mkldnn._reorder_linear_weight`): the same
  kernel for every row count while K <= 1024 (K-slices of <= 1024 summed in a fixed order for the
  3072-wide down-projection), but its 1-row path is no faster than the padded 2-row one;
- MKL (plain or `_mkl_reorder_linear_weight`-packed) and zentorch 2.13's `zentorch_linear_unary`
  (plain or pre-packed): 1 row (and for MKL 2-3 rows) differs from larger batches.
The kernel (invariant_gemm.cpp) computes every output as bias followed by one FMA per input in input
order, whatever the row count, so any two row counts agree bitwise; it reads an [in, out] weight,
the layout GPT-2 stores, so no weight is copied.

It is compiled on first use with torch's C++ extension builder (g++, cached per source under
torch's extension directory; about 1-2 min of CPU once), in one extension with the other CPU
kernels of the compact forward: the int8/int4 weight-only GEMMs (quantized_gemm.cpp, used by
quantize.py) and the paged decode attention (paged_attention.cpp, used by attention.py and the KV
pool). Where it cannot be built (no compiler, no AVX-512) `kernel()` returns None and each user
keeps its library path: oneDNN with padding, PyTorch's weight-only kernels, gathered attention.
"""

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

from app.engine.models.activations import KERNEL_ACTIVATIONS

log = logging.getLogger(__name__)

# One extension for the CPU kernels: the fp32 GEMM here, the weight-only GEMMs (quantize.py) and the
# paged decode attention (attention.py); kernels.h is their shared header.
_SOURCE_DIR = Path(__file__).parent
_SOURCES = [_SOURCE_DIR / name for name in ("invariant_gemm.cpp", "quantized_gemm.cpp", "paged_attention.cpp")]
_state: dict[str, ModuleType | None] = {}
_use = [True]


def kernel() -> ModuleType | None:
    """The compiled extension (built on first call, then cached), or None where it cannot run here."""
    if "module" not in _state:
        _state["module"] = _build()
    return _state["module"]


# -mavx512vnni: only the int4 kernel uses VNNI instructions, and quantize.py packs int4 for it only
# where the CPU has them (`torch.cpu._is_vnni_supported()`); the other kernels are plain AVX-512.
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-ffp-contract=off", "-fopenmp"]
_NAME = "textgen_invariant_gemm"


def build_directory(stamp: str | None = None) -> Path:
    """Where the extension for these sources (their `_stamp`) is built and kept:
    `textgen_kernels/<stamp>` under `$TORCH_EXTENSIONS_DIR`, else under torch's default extension
    root (the container image builds it there at build time). One directory per stamp: trees with
    other sources (another checkout, a branch) never rebuild over each other's module."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "textgen_kernels" / (stamp or _stamp())[:16]


def _stamp() -> str:
    """What the built module depends on: the sources, the header, the flags, torch and Python."""
    digest = hashlib.sha256()
    for path in [*_SOURCES, _SOURCE_DIR / "kernels.h"]:
        digest.update(path.read_bytes())
    digest.update(" ".join([*_FLAGS, torch.__version__, sys.version]).encode())
    return digest.hexdigest()


def _prebuilt(directory: Path, stamp: str) -> ModuleType | None:
    """The module built earlier for exactly these sources (its stamp matches), imported directly:
    torch's builder would run ninja and the compiler again in every new process, and a container's
    runtime image has neither (it copies the module built in its build stage)."""
    library = directory / f"{_NAME}.so"
    stamp_file = directory / "textgen.stamp"
    if not library.exists() or not stamp_file.exists() or stamp_file.read_text().strip() != stamp:
        return None
    spec = importlib.util.spec_from_file_location(_NAME, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# torch's builder holds `lock` in the build directory while it compiles and waits, without a bound,
# for another process's lock to go. A build killed midway leaves it behind, and every later start
# then hangs (seen: test servers never became healthy). A build takes 1-2 min of CPU here, so a lock
# this old belongs to no live build.
_STALE_LOCK_S = 15 * 60


def _break_stale_lock(directory: Path) -> None:
    lock = directory / "lock"
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > _STALE_LOCK_S:
            log.warning("removing a stale build lock %s (%.0f min old: a build killed midway)", lock, age / 60)
            lock.unlink()


def _build() -> ModuleType | None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        log.info(
            "CPU kernels unavailable (they need AVX-512): fp32 GEMMs on oneDNN with 2-row padding, "
            "weight-only GEMMs on PyTorch's kernels, decode attention over gathered pages"
        )
        return None
    stamp = _stamp()  # reads every source: once per process
    directory = build_directory(stamp)
    try:
        module = _prebuilt(directory, stamp)
        if module is not None:
            return module
        directory.mkdir(parents=True, exist_ok=True)
        _break_stale_lock(directory)
        module = cpp_extension.load(
            _NAME,
            [str(source) for source in _SOURCES],
            extra_include_paths=[str(_SOURCE_DIR)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
        (directory / "textgen.stamp").write_text(stamp + "\n")
    except Exception as exc:  # noqa: BLE001 - any build failure means: keep the library path
        log.warning(
            "CPU kernels did not build (%s): fp32 GEMMs on oneDNN with 2-row padding, weight-only GEMMs on "
            "PyTorch's kernels, decode attention over gathered pages; install g++ and ninja to build them",
            exc,
        )
        return None
    return module


def enabled() -> bool:
    """Whether fp32 CPU weights wrapped from now on go to the kernel (it runs here and `use(False)`
    was not called)."""
    return _use[0] and kernel() is not None


def use(flag: bool) -> None:
    """Send fp32 weights wrapped from now on to the kernel (True, the default) or to oneDNN with
    padding (False: the comparison path of `python -m bench.step`, and tests)."""
    _use[0] = flag


@dataclass(eq=False)
class InputMajorWeight:
    """An fp32 linear weight stored [in, out] contiguous (`data`), for the invariant kernel.

    `shape` is [out, in], as for every other `Weight`."""

    data: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[1], self.data.shape[0]))

    def dim(self) -> int:
        return 2

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
        """x [N, in] fp32 -> activation(x @ weight.T + bias) [N, out] fp32; each row's bits
        independent of N. activation: "none", "silu", "gelu_tanh" or "gelu", applied per element in
        the kernel (an element's bits depend on its value alone)."""
        act = KERNEL_ACTIVATIONS[activation]
        if torch.compiler.is_compiling():
            return invariant_linear_op(x, self.data, bias, act)
        module = kernel()
        assert module is not None
        return module.kn_linear(x, self.data, bias, act)


@torch.library.custom_op("textgen::invariant_linear", mutates_args=())
def invariant_linear_op(
    x: torch.Tensor, weight_in_out: torch.Tensor, bias: torch.Tensor | None, activation: int
) -> torch.Tensor:
    """The kernel as an opaque op for torch.compile (TEXTGEN_COMPILE)."""
    module = kernel()
    assert module is not None
    return module.kn_linear(x, weight_in_out, bias, activation)


@invariant_linear_op.register_fake
def _(x: torch.Tensor, weight_in_out: torch.Tensor, bias: torch.Tensor | None, activation: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight_in_out.shape[1]))


def input_major(param: torch.Tensor, stored_out_in: bool) -> InputMajorWeight:
    """`param` as an `InputMajorWeight`, sharing its storage.

    stored_out_in: the parameter's logical shape is [out, in] (nn.Linear, an LM head, a tied
    embedding), else [in, out] (GPT-2's Conv1D). Where the storage is not [in, out] contiguous yet,
    it is transposed once and the parameter re-pointed at the new storage (a view with its old shape
    and values), so the transformers forward still works and no second copy is kept."""
    logical = param.detach()
    in_out = logical.t() if stored_out_in else logical
    if not in_out.is_contiguous():
        in_out = in_out.contiguous()
        param.data = in_out.t() if stored_out_in else in_out
    return InputMajorWeight(in_out)
