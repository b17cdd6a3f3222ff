"""Speculative decoding benchmark: single-stream tok/s with TEXTGEN_SPECULATIVE=ngram against off,
through the real engine in-process, rounds alternated, best round each; outputs compared bitwise.

    python -m bench.spec [--rounds 3] [--requests 3] [--new-tokens 64] [--k 4] [--threads N] [--clients 1]
                         [--workloads grounded,standard]

Workloads, both on the GPT-2-124M shape (12 layers, 768 wide, 50257-token vocabulary: the same
GEMMs and KV cache per token as the standard benchmark):
- standard: the benchmark model (random weights, bench/model.py), 32-token prompts, greedy;
- grounded: an answer that copies spans of a 300-token prompt. With random weights no model copies,
  so this one is scripted (as tests/scripted_model.py): every block's output projections are zero,
  so the residual stream is the token's one-hot state, and the untied LM head maps the state of
  script token i to token i + 1, except every 16th token, which jumps 37 tokens ahead. The prompt
  is 292 consecutive script tokens (of 296) and a quote of 8 of them; the answer walks the script
  from the quote with those jumps, so it copies 16-token spans of the prompt (and, about one token
  in 50, a script token the prompt lacks), and a draft crossing a jump is rejected. Its compute is
  the full GPT-2-124M step; only the weights' values are chosen;
- adversarial (not run by default): the same with a jump of 39 after every token, so the newest
  token always recurs in the prompt and every draft is wrong: the cost of verifying drafts that are all rejected.
Each round runs `requests` requests one after another (single stream, EOS ignored) on a fresh
engine with speculation off, then on; tok/s = generated tokens / wall time from submit to the last
token (prefill included). `--clients N` submits N requests at a time instead (batched throughput). The model loads on a thread that ends (app/own_thread.py explains why).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.model import SHARED_TOKENIZER, default_model_dir, ensure_model, make_prompts

SCRIPT_TOKENS = 296  # distinct script tokens (states); the prompt holds 292 of them
PROMPT_TOKENS = 300
JUMP_EVERY, JUMP = 16, 37
QUOTE = 8


def grounded_model(path: Path, seed: int = 0, jump_every: int = JUMP_EVERY, jump: int = JUMP) -> tuple[Path, list[int]]:
    """Build (once) the scripted GPT-2-124M-shaped model; return it and its script's token ids.
    `jump_every` 1: every token jumps `jump` ahead, so no draft taken from the prompt is right."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(SHARED_TOKENIZER)
    script = rng.sample(range(256, len(tok) - 1), SCRIPT_TOKENS)
    marker = path / "script.json"
    if marker.exists() and json.loads(marker.read_text()) == [jump_every, jump, *script]:
        return path, script
    torch.manual_seed(seed)
    config = GPT2Config(tie_word_embeddings=False)
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        embed, head = model.transformer.wte.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0  # state 0: any token outside the script
        head.zero_()
        head[script[0], 0] = 10.0
        for i, token in enumerate(script):
            embed[token].zero_()
            embed[token, i + 1] = 1.0
            step = jump if i % jump_every == jump_every - 1 else 1
            head[script[(i + step) % SCRIPT_TOKENS], i + 1] = 10.0
    model.generation_config = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    marker.write_text(json.dumps([jump_every, jump, *script]))
    return path, script


def _on_thread(fn: Any, *args: Any) -> Any:
    """fn(*args) on a thread that ends (its OpenMP team with it)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # re-raised below
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def run_round(lm: Any, prompts: list[list[int]], new_tokens: int, speculative: Any, clients: int = 1) -> dict[str, Any]:
    """One engine, `prompts` in waves of `clients` submitted together (1: one after another); tok/s,
    outputs and the speculation counters."""
    from app.engine.core.types import Completion, Event, GenerationRequest, SamplingParams, StoppingParams
    from app.engine.engine import Engine
    from app.metrics import Metrics

    metrics = Metrics()
    engine = Engine(
        lm,
        None,  # type: ignore[arg-type]  # no embeddings
        max_batch_size=clients,
        max_batch_tokens=2048 * clients,
        max_prefill_tokens=1024 * clients,
        max_queue=4 * clients,
        metrics=metrics,
        speculative=speculative,
    )
    engine.start()
    outputs: list[tuple[list[int], list[float]]] = []
    tokens = 0
    elapsed = 0.0
    decode_s = 0.0  # first token to last: the decode steps alone (single stream)
    try:
        for wave in range(0, len(prompts), clients):
            group = prompts[wave : wave + clients]
            done = [threading.Event() for _ in group]
            results: list[list[Completion]] = [[] for _ in group]

            def on_event(result: list[Completion], finished: threading.Event) -> Any:
                def handle(event: Event) -> None:
                    if event.completion is not None:
                        result.append(event.completion)
                        finished.set()

                return handle

            start = time.perf_counter()
            stopping = StoppingParams(new_tokens, new_tokens, ignore_eos=True)
            for i, prompt in enumerate(group):
                engine.submit(GenerationRequest(prompt, SamplingParams(), stopping, on_event(results[i], done[i])))
            for flag in done:
                if not flag.wait(900):
                    raise RuntimeError("the engine did not finish in 900 s")
            elapsed += time.perf_counter() - start
            for result in results:
                completion = result[0]
                if completion.error is not None:
                    raise RuntimeError(completion.error)
                tokens += completion.generated_tokens
                if completion.timeline is not None:
                    decode_s += completion.timeline.finished - completion.timeline.first_token
                outputs.append(([t.id for t in completion.tokens], [t.logprob for t in completion.tokens]))
    finally:
        engine.stop()
    counts = {
        s.name: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name.startswith("vllm:spec_decode")
    }
    return {
        "tok_s": tokens / elapsed,
        # per request, first token to last (meaningful for a single stream only)
        "decode_tok_s": (tokens - len(prompts)) / decode_s if decode_s else 0.0,
        "outputs": outputs,
        "drafted": counts.get("vllm:spec_decode_num_draft_tokens_total", 0),
        "accepted": counts.get("vllm:spec_decode_num_accepted_tokens_total", 0),
    }


def workload(name: str, requests: int) -> tuple[Path, list[list[int]]]:
    if name == "standard":
        info = ensure_model(default_model_dir(0))
        return info.path, [ids for _, ids in make_prompts(info.path, requests)]
    root = Path(tempfile.gettempdir()) / "textgen-bench"
    if name == "adversarial":
        # 39 is prime to the script's 296 tokens: the walk does not come back within the answer.
        path, script = grounded_model(root / "gpt2-124m-adversarial-seed0", jump_every=1, jump=39)
    else:
        path, script = grounded_model(root / "gpt2-124m-grounded-seed0")
    prompts = []
    for r in range(requests):  # rotations of the script, so each request copies other spans
        start = 23 * r
        # A document (292 script tokens), then a question quoting 8 of them: the answer goes on from
        # the quote, so it starts inside the document.
        document = [script[(start + i) % SCRIPT_TOKENS] for i in range(PROMPT_TOKENS - QUOTE)]
        prompts.append(document + document[100 : 100 + QUOTE])
    return path, prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3, help="requests per round, one after another")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="TEXTGEN_SPECULATIVE_TOKENS")
    p.add_argument("--ngram-min", type=int, default=1)
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--workloads", default="grounded,standard")
    p.add_argument("--clients", type=int, default=1, help="requests submitted together (1: single stream)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # before any parallel op, so no OpenMP team is left behind

    from app.engine.load.loader import load_model
    from app.engine.runner.speculative import SpeculativeConfig

    config = SpeculativeConfig(args.k, args.ngram_min, args.ngram_max)
    import torch

    print(
        f"speculative decoding, {args.clients} client(s), {args.new_tokens} new tokens, k={args.k}, n-gram "
        f"{args.ngram_min}..{args.ngram_max}, {args.requests} requests x {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    for name in args.workloads.split(","):
        path, prompts = _on_thread(workload, name, args.requests * args.clients)
        lm = _on_thread(load_model, str(path))
        best: dict[str, float] = {"off": 0.0, "on": 0.0}
        best_decode: dict[str, float] = {"off": 0.0, "on": 0.0}
        identical = True
        reference = None
        accepted = drafted = 0.0
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                r = run_round(lm, prompts, args.new_tokens, config if mode == "on" else None, args.clients)
                best[mode] = max(best[mode], r["tok_s"])
                best_decode[mode] = max(best_decode[mode], r["decode_tok_s"])
                if reference is None:
                    reference = r["outputs"]
                identical = identical and r["outputs"] == reference
                if mode == "on":
                    accepted, drafted = r["accepted"], r["drafted"]
                print(
                    f"  {name} round {round_ + 1} {mode}: {r['tok_s']:.1f} tok/s "
                    f"(decode alone {r['decode_tok_s']:.1f})",
                    flush=True,
                )
        rate = accepted / drafted if drafted else 0.0
        print(
            f"{name}: off {best['off']:.1f} tok/s, on {best['on']:.1f} tok/s, "
            f"{best['on'] / best['off']:.2f}x (decode alone {best_decode['off']:.1f} -> {best_decode['on']:.1f}, "
            f"{best_decode['on'] / best_decode['off']:.2f}x); drafts accepted {accepted:.0f}/{drafted:.0f} ({rate:.0%}); "
            f"ids and logprobs identical on/off: {'yes' if identical else 'NO'}",
            flush=True,
        )
        if not identical:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
