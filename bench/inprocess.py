"""In-process reference points: sequential and static-batch `model.generate`, and the
prefill-plus-one-step time that bounds time to first token."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.stats import PhaseResult, percentile, shortest_quarter

Progress = Callable[[str], None]


class InProcess:
    """The benchmark model loaded once in this process (fp32, eval, no grad)."""

    def __init__(self, path: Path, eos_token_id: int) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos = eos_token_id

    def close(self) -> None:
        del self.model
        gc.collect()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
        """Greedy, EOS suppressed (min_new_tokens = max_new_tokens); returns generated tokens."""
        input_ids = torch.tensor([list(p) for p in prompts], dtype=torch.long)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.eos,
            eos_token_id=self.eos,
        )
        return int(out.shape[0] * (out.shape[1] - input_ids.shape[1]))

    def warm_up(self, prompt: Sequence[int], batch: int) -> None:
        self.generate([prompt], 4)
        self.generate([prompt] * batch, 4)

    def sequential(self, prompts: Sequence[Sequence[int]], new_tokens: int, progress: Progress) -> PhaseResult:
        """Baseline: one request at a time."""
        e2e: list[float] = []
        total = 0
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            total += self.generate([prompt], new_tokens)
            e2e.append(time.perf_counter() - t0)
            progress(f"baseline: {i + 1}/{len(prompts)} requests")
        wall = time.perf_counter() - start
        return PhaseResult("baseline: sequential generate", 1, len(prompts), total, wall, e2e_s=e2e)

    def static_batch(self, prompts: Sequence[Sequence[int]], new_tokens: int, progress: Progress) -> PhaseResult:
        """Ceiling: every prompt in one `generate` call."""
        progress(f"ceiling: static batch of {len(prompts)} x {new_tokens} tokens")
        start = time.perf_counter()
        total = self.generate(prompts, new_tokens)
        wall = time.perf_counter() - start
        return PhaseResult(
            f"ceiling: static batch {len(prompts)}", len(prompts), len(prompts), total, wall, e2e_s=[wall]
        )

    @torch.inference_mode()
    def prefill_plus_one_step(self, prompt: Sequence[int], reps: int) -> dict[str, Any]:
        """Median time of a batch-1 prefill of `prompt` plus one decode step, with the KV cache."""
        input_ids = torch.tensor([list(prompt)], dtype=torch.long)

        def once() -> tuple[float, float]:
            t0 = time.perf_counter()
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            out = self.model(input_ids=nxt, cache=out.cache, use_cache=True)
            out.logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
            return t1 - t0, t2 - t0

        for _ in range(2):
            once()
        prefill, both = zip(*(once() for _ in range(reps)), strict=True)
        return {
            "reps": reps,
            "prefill_p50_s": round(percentile(prefill, 50) or 0.0, 5),
            "prefill_plus_one_step_p50_s": round(percentile(both, 50) or 0.0, 5),
        }

    def mixed_static(
        self,
        prompts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        group: int,
        progress: Progress,
    ) -> PhaseResult:
        """Static batching of a mixed workload: groups of `group` in arrival order, each run to its
        longest member. Counts the tokens requests asked for (not the padding work); a request's
        latency is the time from the start of the run to the end of its group."""
        latency = [0.0] * len(prompts)
        start = time.perf_counter()
        for g in range(0, len(prompts), group):
            members = range(g, min(g + group, len(prompts)))
            self.generate([prompts[i] for i in members], max(lengths[i] for i in members))
            end = time.perf_counter() - start
            for i in members:
                latency[i] = end
            progress(f"mixed static: {members[-1] + 1}/{len(prompts)} requests")
        wall = time.perf_counter() - start
        result = PhaseResult(f"mixed static: groups of {group}", group, len(prompts), sum(lengths), wall, e2e_s=latency)
        result.extra["shortest_quarter_p50_s"] = _quarter_p50(lengths, latency)
        return result


def _quarter_p50(lengths: Sequence[int], latency: Sequence[float]) -> float | None:
    value = percentile([latency[i] for i in shortest_quarter(lengths)], 50)
    return None if value is None else round(value, 4)
