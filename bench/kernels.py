"""The weight-only and fp32 GEMM kernels alone, on GPT-2-124M's layer shapes, as a decode step calls
them: how long one step's 48 layer GEMMs take and how many GB/s of weights that reads.

    python -m bench.kernels [--rows 1,32] [--modes int8,int4,fp32] [--threads 1] [--steps 20]

For each row count and mode, 12 layers of GPT-2-124M's four shapes (768->2304 qkv, 768->768
proj, 768->3072 fc, 3072->768 fc2; random weights, packed as `TEXTGEN_QUANTIZE` packs them) are
multiplied in turn, so the weights come from DRAM as in a real step, not from cache. Prints the best
and median step over `steps` steps. With `--threads 1` (the default) it times the thread's CPU time
(`time.thread_time`), which barely moves when other processes share the cores; with more threads,
wall time. The LM head is not included (int8 in both quantized modes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of one GPT-2-124M block
LAYERS = 12


def layer_gemms(mode: str, rows: int) -> tuple[list[Callable[[], torch.Tensor]], int]:
    """One step's GEMMs of `mode` at `rows` rows, and the bytes of weights they read."""
    from app.engine.models import invariant_gemm
    from app.engine.models.quantize import pack_int4, pack_int8

    g = torch.Generator().manual_seed(0)
    calls: list[Callable[[], torch.Tensor]] = []
    nbytes = 0
    for _ in range(LAYERS):
        for in_features, out_features in SHAPES:
            weight = torch.randn(out_features, in_features, generator=g) * 0.02
            x = torch.randn(rows, in_features, generator=g)
            if mode == "fp32":
                wrapped = invariant_gemm.input_major(weight.t().contiguous(), stored_out_in=False)
                calls.append(lambda w=wrapped, x=x: w.matmul(x, None))
                nbytes += weight.numel() * 4
                continue
            packed = (pack_int8 if mode == "int8" else pack_int4)(weight)
            assert packed is not None, f"{mode} does not pack {weight.shape}"
            calls.append(lambda p=packed, x=x: p.matmul(x))
            nbytes += packed.data.numel() * packed.data.element_size()
            nbytes += packed.scales.numel() * packed.scales.element_size()
    return calls, nbytes


def time_step(calls: list[Callable[[], torch.Tensor]], steps: int) -> list[float]:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(3):
        for call in calls:
            call()
    times = []
    for _ in range(steps):
        start = clock()
        for call in calls:
            call()
        times.append(clock() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,32")
    p.add_argument("--modes", default="int8,int4,fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from app.engine.models import invariant_gemm

    if invariant_gemm.kernel() is None:
        print("the kernels did not build here (see the log): nothing to time")
        return 1
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    print(f"{LAYERS} x GPT-2-124M block shapes, {args.threads} thread(s), {clock}, best / median of {args.steps}")
    for rows in [int(r) for r in args.rows.split(",")]:
        for mode in args.modes.split(","):
            calls, nbytes = layer_gemms(mode, rows)
            times = time_step(calls, args.steps)
            best, median = min(times), statistics.median(times)
            print(
                f"rows {rows:3d}  {mode:5s} {best * 1e3:8.2f} / {median * 1e3:8.2f} ms a step, "
                f"{nbytes / 1e6:6.1f} MB of weights, {nbytes / best / 1e9:5.1f} GB/s at best",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
