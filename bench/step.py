"""In-process decode-step benchmark: the transformers forward (`Batch`) against the compact forward
(`CompactBatch`), batch-invariant and not, alternated in rounds, on the GPT-2-124M shape (random
weights) or any GPT-2/Llama model directory.

    python -m bench.step [--model DIR] [--batch 1,32] [--steps 32] [--rounds 3] [--compile]
                         [--dtype float32|bfloat16] [--kv-dtype bfloat16]
                         [--quantize MODE[,MODE...]] [--paths compact,...] [--profile]
                         [--threads N] [--cpu-time]

Each round prefills `batch` prompts of 32 tokens (timed: the `prefill` line), then times `steps`
greedy decode steps including the sampler (`choose`), as the engine runs them. Prints ms/step,
tok/s and the speed-up over the first path timed, best round, and each path's best prefill.
`--quantize` loads the model with TEXTGEN_QUANTIZE's quantized layers (further modes in its list
add paths `compact-MODE`); with it or another dtype than fp32, the default fp32 compact forward runs
too ("compact-fp32", batch-invariant), the reference for the mode. Ratios are against the first path
timed (`--paths`, default all: transformers, compact, compact-not-invariant, compact-onednn,
compact-onednn-not-invariant[, compact-fp32]). The `compact-onednn` paths wrap the same weights with
fp32 GEMMs on oneDNN instead of the invariant kernel (app/engine/models/invariant_gemm.py): padded to
2 rows when batch-invariant (the path before that kernel), unpadded when not.

`--cpu-time` times the main thread's CPU time instead of wall time: with `--threads 1` that is the
whole step's compute, and it barely moves when other processes share the cores (wall time on a
loaded 2-core machine swings 2x).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch

from bench.model import default_model_dir, ensure_model


def _seqs(tokenizer: object, batch: int, vocab: int) -> list:
    from app.engine.core.sequence import Sequence
    from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams

    out = []
    for i in range(batch):
        ids = [(97 * i + 31 * j) % (vocab - 10) + 5 for j in range(32)]
        request = GenerationRequest(ids, SamplingParams(), StoppingParams(10_000), lambda e: None)
        out.append(Sequence(request, tokenizer, frozenset(), frozenset(), 1 << 20, torch.device("cpu")))  # type: ignore[arg-type]
    return out


_clock = time.perf_counter

# A timed path: prefill(seqs) -> (batch, last logits) and decode(batch) -> logits.
Forward = tuple[Callable[[list], tuple[Any, torch.Tensor]], Callable[[Any], torch.Tensor]]


def transformers_forward(model: Any) -> Forward:
    """The transformers forward (`Batch`) of an HF model."""
    from app.engine.runner.batch import Batch

    return (lambda seqs: Batch.prefill(model, seqs, False)[:2]), (lambda b: b.decode(model))


def compact_forward(model: Any, options: Any) -> Forward:
    """The compact forward (`CompactBatch`) of a compact model, run as its `ForwardOptions` say."""
    from app.engine.runner.compact_batch import CompactBatch

    return (lambda seqs: CompactBatch.prefill(model, options, seqs, False)[:2]), (lambda b: b.decode(model, options))


@torch.inference_mode()
def time_steps(forward: Forward, lm: object, batch: int, steps: int) -> tuple[float, float]:
    """Seconds per decode step (sampler included) after a prefill and 2 warm-up steps, and the
    seconds the prefill of the `batch` 32-token prompts took."""
    from app.engine.sample.sampling import choose

    prefill, decode = forward
    seqs = _seqs(lm.tokenizer, batch, lm.model.config.vocab_size)  # type: ignore[attr-defined]
    began = _clock()
    b, logits = prefill(seqs)
    prefill_s = _clock() - began
    b.set_next([c.token_id for c in choose(logits, b.seqs, b.sampling)])
    for _ in range(2):
        b.set_next([c.token_id for c in choose(decode(b), b.seqs, b.sampling)])
    start = _clock()
    for _ in range(steps):
        b.set_next([c.token_id for c in choose(decode(b), b.seqs, b.sampling)])
    return (_clock() - start) / steps, prefill_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: the bench's GPT-2-124M shape)")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-dtype", default="auto")
    p.add_argument(
        "--quantize",
        default="none",
        help="TEXTGEN_QUANTIZE mode of the model the paths run (none, int8-weight-only, int4-weight-only, "
        "int8-dynamic); a comma-separated list adds a path 'compact-MODE' for each further mode",
    )
    p.add_argument("--paths", help="comma-separated paths to time, in this order (default: all)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--cpu-time", action="store_true", help="time the main thread's CPU time (use with --threads 1)")
    p.add_argument("--profile", action="store_true", help="print the top ops of the compact step")
    p.add_argument("--compile", action="store_true", help="also time the compiled step (TEXTGEN_COMPILE)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = time.thread_time if args.cpu_time else time.perf_counter
    from dataclasses import replace

    from app.engine.load.loader import LoadedModel, load_model
    from app.engine.models import compact_model, invariant_gemm
    from app.engine.models.quantize import Quantize

    path = args.model or ensure_model(default_model_dir(0)).path
    modes = args.quantize.split(",")
    unknown = set(modes) - set(get_args(Quantize))
    if unknown:
        p.error(f"--quantize: unknown mode(s) {', '.join(sorted(unknown))}")
    args.quantize = modes[0]
    lm = load_model(str(path), device="cpu", dtype=args.dtype, kv_cache_dtype=args.kv_dtype, quantize=args.quantize)
    assert lm.compact is not None and lm.forward_options is not None, "this model has no compact forward"
    not_invariant = replace(lm.forward_options, batch_invariant=False)  # the same weights, without batch invariance
    invariant_gemm.use(False)  # the same weights, fp32 GEMMs on oneDNN
    onednn = compact_model(lm.model)
    invariant_gemm.use(True)
    assert onednn is not None

    def loaded_forward(loaded: LoadedModel) -> Forward:
        assert loaded.compact is not None and loaded.forward_options is not None
        return compact_forward(loaded.compact, loaded.forward_options)

    paths = {
        "transformers": transformers_forward(lm.model),
        "compact": loaded_forward(lm),
        "compact-not-invariant": compact_forward(lm.compact, not_invariant),
        "compact-onednn": compact_forward(onednn, lm.forward_options),
        "compact-onednn-not-invariant": compact_forward(onednn, not_invariant),
    }
    if args.quantize != "none" or args.dtype != "float32" or args.kv_dtype not in ("auto", "float32"):
        paths["compact-fp32"] = loaded_forward(load_model(str(path), device="cpu", dtype="float32"))
    for mode in modes[1:]:
        other = load_model(str(path), device="cpu", dtype=args.dtype, kv_cache_dtype=args.kv_dtype, quantize=mode)
        paths[f"compact-{mode}"] = loaded_forward(other)
    if args.compile:
        began = time.perf_counter()
        compiled = load_model(str(path), device="cpu", dtype=args.dtype, kv_cache_dtype=args.kv_dtype, compile=True)
        print(f"TEXTGEN_COMPILE warm-up: load + compile {time.perf_counter() - began:.1f} s")
        paths["compact-compiled"] = loaded_forward(compiled)
    if args.paths:
        wanted = args.paths.split(",")
        paths = {n: paths[n] for n in wanted}
    print(
        f"model {path} dtype {args.dtype} kv {args.kv_dtype} quantize {args.quantize} threads {torch.get_num_threads()}"
    )
    for batch in [int(x) for x in args.batch.split(",")]:
        best: dict[str, float] = {}
        best_prefill: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, forward in paths.items():
                dt, prefill_s = time_steps(forward, lm, batch, args.steps)
                best[name] = min(best.get(name, float("inf")), dt)
                best_prefill[name] = min(best_prefill.get(name, float("inf")), prefill_s)
        first = next(iter(best.values()))
        line = "  ".join(
            f"{n}: {dt * 1e3:7.2f} ms/step {batch / dt:6.1f} tok/s ({first / dt:.2f}x)" for n, dt in best.items()
        )
        print(f"batch {batch:3d}  {line}")
        prefills = "  ".join(f"{n}: {s * 1e3:8.1f} ms" for n, s in best_prefill.items())
        print(f"prefill {batch} x 32 tokens  {prefills}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_steps(loaded_forward(lm), lm, batch, 8)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
