"""Accuracy of the precision modes against fp32: mean KL divergence of the next-token distributions
and top-1 agreement, teacher-forced on fp32's own greedy continuations (as llama.cpp's
`llama-perplexity --kl-divergence` scores a quantized model against its base).

    python -m bench.accuracy [--model DIR] [--prompts 32] [--tokens 64]
                             [--modes bfloat16,int8-weight-only,...,llama.cpp-q8_0,llama.cpp-q4_0]

For each of `prompts` prompts of 32 tokens (bench.model's prompts), fp32 (the compact forward,
batch-invariant) generates `tokens` greedy tokens; every mode then runs prompt + continuation in
one prefill, and at each of the `tokens` positions whose next token fp32 chose we compare
distributions: KL(p_fp32 || p_mode) in nats (mean over prompts and positions), and how often the
mode's argmax equals fp32's. Mode names: TEXTGEN_QUANTIZE's, or `bfloat16` (weights, activations
and KV cache), or `bf16-kv` (fp32 weights, bf16 KV cache). Default model: the bench's GPT-2-124M
shape (random weights: near-flat distributions, so KL is small and top-1 is fragile); pass a trained
model (`../shared/models/stories260k`) for numbers that mean something.

The `llama.cpp-*` modes score llama.cpp's GGUFs of the same model (bench/llama_accuracy.py: f32 as
the control, whose KL must be ~0, then q8_0 and q4_0) against the same fp32 reference, through
`llama-server`'s `n_probs` with the whole vocabulary. They need `make bench-peers` (llama-server
built); the GGUFs are converted on first use. A mode that cannot run is printed as skipped, with why.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.llama_accuracy import LLAMA_MODES, llama_log_probs
from bench.model import default_model_dir, ensure_model, make_prompts

MODES = {
    "bfloat16": {"dtype": "bfloat16", "kv_cache_dtype": "bfloat16"},
    "bf16-kv": {"kv_cache_dtype": "bfloat16"},
    "int8-weight-only": {"quantize": "int8-weight-only"},
    "int4-weight-only": {"quantize": "int4-weight-only"},
    "int8-dynamic": {"quantize": "int8-dynamic"},
}


def _seq(lm: object, ids: list[int], new: int) -> object:
    from app.engine.core.sequence import Sequence
    from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams

    request = GenerationRequest(ids, SamplingParams(), StoppingParams(new, new), lambda e: None)
    return Sequence(request, lm.tokenizer, frozenset(), frozenset(), 1 << 20, torch.device("cpu"))  # type: ignore[attr-defined]


@torch.inference_mode()
def continuations(lm: object, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """fp32's greedy continuation of each prompt, all prompts in one batch (batch-invariant: the same
    as each alone)."""
    from app.engine.runner.compact_batch import CompactBatch

    model, options = lm.compact, lm.forward_options  # type: ignore[attr-defined]
    batch, logits, _ = CompactBatch.prefill(model, options, [_seq(lm, p, tokens) for p in prompts], False)
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(tokens):
        chosen = logits.float().argmax(-1).tolist()
        for row, t in enumerate(chosen):
            out[row].append(t)
        if step + 1 < tokens:
            batch.set_next(chosen)
            logits = batch.decode(model, options)
    return out


@torch.inference_mode()
def log_probs(lm: object, prompts: list[list[int]], conts: list[list[int]]) -> torch.Tensor:
    """Log-probabilities [prompts, tokens, vocab] (fp32) of the next token at each position whose
    next token is a continuation token, from one prefill of prompt + continuation per prompt."""
    from app.engine.runner.compact_batch import CompactBatch

    model, options = lm.compact, lm.forward_options  # type: ignore[attr-defined]
    rows = []
    for p, c in zip(prompts, conts, strict=True):
        ids = p + c[:-1]  # the position before each continuation token
        _, _, full = CompactBatch.prefill(model, options, [_seq(lm, ids, 1)], True)
        assert full is not None
        rows.append(torch.log_softmax(full[0, len(p) - 1 :].float(), dim=-1))
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the bench's GPT-2-124M shape)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default=",".join([*MODES, *LLAMA_MODES]))
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    known = [*MODES, *LLAMA_MODES]
    unknown = [m for m in modes if m not in known]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    from app.engine.load.loader import load_model

    path = args.model or ensure_model(default_model_dir(0)).path
    base = load_model(str(path), device="cpu", dtype="float32")
    assert base.compact is not None, "this model has no compact forward"
    if args.model is None:
        prompts = [ids for _, ids in make_prompts(path, args.prompts)]
    else:  # a model of its own vocabulary: deterministic ids from it, 32 tokens (after its BOS, if any)
        vocab = base.model.config.vocab_size
        bos = [base.tokenizer.bos_token_id] if base.tokenizer.bos_token_id is not None else []
        prompts = [
            bos + [(97 * i + 31 * j) % (vocab - 10) + 5 for j in range(32 - len(bos))] for i in range(args.prompts)
        ]
    began = time.perf_counter()
    conts = continuations(base, prompts, args.tokens)
    reference = log_probs(base, prompts, conts)
    print(
        f"model {path}: {len(prompts)} prompts x {args.tokens} tokens, reference fp32 ({time.perf_counter() - began:.0f} s)"
    )
    print(f"{'mode':<18} {'mean KL (nats)':>15} {'max KL':>9} {'top-1 agree':>12}")
    for mode in modes:
        if mode in LLAMA_MODES:
            theirs = llama_log_probs(Path(path), LLAMA_MODES[mode], prompts, conts)
            if isinstance(theirs, str):
                print(f"{mode:<18} skipped: {theirs}", flush=True)
                continue
            ours = theirs
        else:
            lm = load_model(str(path), device="cpu", **MODES[mode])  # type: ignore[arg-type]
            ours = log_probs(lm, prompts, conts)
            del lm
        kl, top1 = divergence(reference, ours)
        print(f"{mode:<18} {float(kl.mean()):15.6f} {float(kl.max()):9.4f} {top1 * 100:11.1f}%", flush=True)
    return 0


def divergence(reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, float]:
    """KL(p_ref || p_other) in nats per position [prompts, tokens], and the share of positions
    where both argmaxes agree; both inputs are log-probabilities [prompts, tokens, vocab]."""
    kl = (reference.exp() * (reference - other)).sum(-1)
    top1 = float((other.argmax(-1) == reference.argmax(-1)).float().mean())
    return kl, top1


if __name__ == "__main__":
    raise SystemExit(main())
