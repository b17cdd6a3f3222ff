"""Exact speculative decoding (app/engine/runner/speculative.py): drafts, and bitwise equality on/off.

Outputs are compared with `==`: token ids, logprobs, top candidates and text, with speculation on
(requests batched, joining at staggered times) against speculation off (each request alone).
"""

import random
import time
from pathlib import Path

import pytest
import torch

from app.engine.core.constraints import Grammar, GrammarCompiler, GrammarSpec
from app.engine.core.sequence import Sequence
from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.engine import Engine
from app.engine.load.loader import LoadedModel, load_model
from app.engine.models import attention
from app.engine.models.lora import AdapterRegistry
from app.engine.runner.speculative import Drafter, SpeculativeConfig, propose
from app.metrics import Metrics
from tests.adapters import build_adapter
from tests.unit.engine.completions import Completions

NGRAM = SpeculativeConfig(num_tokens=4, ngram_min=1, ngram_max=3)


def test_propose_takes_what_followed_the_longest_recurring_ngram() -> None:
    # "7 8" recurs: the 2-gram wins over the 1-gram "8" alone, and what followed it is the draft.
    assert propose([1, 7, 8, 2, 3, 4, 5, 8, 9, 7, 8], NGRAM, 4) == [2, 3, 4, 5]
    # Capped by the limit and by the config's k.
    assert propose([1, 7, 8, 2, 3, 4, 5, 6, 7, 8], NGRAM, 2) == [2, 3]
    assert propose([5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 5], NGRAM, 10) == [6, 7, 8, 9]


def test_propose_prefers_the_newest_occurrence_with_a_full_draft() -> None:
    ids = [3, 1, 1, 3, 2, 2, 2, 2, 9, 3]
    assert propose(ids, NGRAM, 4) == [2, 2, 2, 2]  # the newest "3" with 4 tokens after it
    # A repeated token: the oldest occurrence leaves the longest continuation.
    assert propose([6, 6, 6], NGRAM, 4) == [6]
    assert propose([6, 6, 6, 6, 6, 6, 6], NGRAM, 4) == [6, 6, 6, 6]


def test_propose_finds_nothing_without_a_recurring_ngram() -> None:
    assert propose([1, 2, 3, 4], NGRAM, 4) == []
    assert propose([1], NGRAM, 4) == []
    assert propose([1, 2, 1], NGRAM, 0) == []
    assert propose([1, 2, 3, 1, 2], SpeculativeConfig(4, 3, 3), 4) == []  # only 2-grams recur


def test_drafts_that_keep_failing_back_off_and_an_accepted_one_resets(gpt2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    request = GenerationRequest([5, 6, 7, 5, 6, 7, 5], SamplingParams(), StoppingParams(100), lambda e: None)
    seq = Sequence(request, tokenizer, frozenset(), frozenset(), 1000, torch.device("cpu"))
    seq.generated = [6]
    drafter = Drafter(NGRAM)
    drafted: list[bool] = []
    for _ in range(37):  # every draft rejected whole: waits of 1, 2, 4, 8, 16 steps between drafts
        d = drafter.drafts([seq])[0]
        drafted.append(bool(d))
        drafter.record([seq], [d], [0])
    assert [i for i, x in enumerate(drafted) if x] == [0, 2, 5, 10, 19, 36], drafted
    for _ in range(16):  # the cap: 16 steps again
        assert drafter.drafts([seq])[0] == []
    expected = propose(seq.all_ids(), NGRAM, 4)
    assert expected
    d = drafter.drafts([seq])[0]
    assert d == expected
    drafter.record([seq], [d], [1])  # one token accepted: the next step drafts again
    assert drafter.drafts([seq])[0] == expected


@pytest.fixture(scope="module", params=["tiny-gpt2", "stories260k"])
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    path: Path = request.getfixturevalue("tiny_gpt2_dir" if request.param == "tiny-gpt2" else "stories260k_dir")
    return load_model(str(path))


Output = tuple[list[int], list[float], list[object], str, str]


def run(
    lm: LoadedModel,
    requests: list[tuple[list[int], SamplingParams, StoppingParams]],
    speculative: SpeculativeConfig | None,
    gaps: list[float] | None,
    grammars: list[Grammar | None] | None = None,
    adapters: tuple[AdapterRegistry, list[str | None]] | None = None,
) -> tuple[list[Output], Metrics]:
    """Submit `requests` to a real engine (`gaps[i]` s after the previous one, or each after the
    previous one finished when None); return each one's ids, logprobs, top candidates, text and
    finish reason, and the engine's metrics."""
    metrics = Metrics()
    engine = Engine(
        lm,
        None,  # type: ignore[arg-type]  # no embedding requests here
        max_batch_size=64,
        max_batch_tokens=64 * 512,
        max_prefill_tokens=4096,
        max_queue=128,
        metrics=metrics,
        check_invariants=True,
        speculative=speculative,
        adapters=adapters[0] if adapters is not None else None,
    )
    assert engine.speculative == speculative
    engine.start()
    completions = Completions(len(requests))

    try:
        for i, (ids, sampling, stopping) in enumerate(requests):
            if gaps is not None:
                time.sleep(gaps[i])
            grammar = grammars[i] if grammars is not None else None
            adapter = adapters[1][i] if adapters is not None else None
            engine.submit(
                GenerationRequest(ids, sampling, stopping, completions.on_event(i), grammar=grammar, adapter=adapter)
            )
            if gaps is None:
                completions.wait(i)
        completions.wait_all()
    finally:
        engine.stop()
    out = []
    for i in range(len(requests)):
        c = completions.done[i]
        assert c.error is None, c.error
        tops = [[(t.id, t.logprob) for t in tok.top] if tok.top else None for tok in c.tokens]
        out.append(([t.id for t in c.tokens], [t.logprob for t in c.tokens], tops, c.text, c.finish_reason))
    return out, metrics


def counter(metrics: Metrics, name: str) -> float:
    """A counter's value (0 when never incremented: its labelled series does not exist yet)."""
    return sum(
        sample.value for family in metrics.registry.collect() for sample in family.samples if sample.name == name
    )


def repetitive_prompt(lm: LoadedModel, rng: random.Random) -> list[int]:
    """A phrase repeated a few times, with noise between: greedy continuations tend to copy it."""
    vocab = lm.model.config.vocab_size
    phrase = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))]
    out: list[int] = []
    for _ in range(rng.randint(2, 4)):
        out += phrase + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 2))]
    return out


STORY = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play with her ball.",
    "One day, Lily saw a big dog.",
    "The dog wanted to play with the ball too.",
    "Lily and the dog played together.",
    "They were happy and had lots of fun.",
]


def story_prompt(lm: LoadedModel, rng: random.Random) -> list[int]:
    """A few sentences of a children's story, told twice: stories260k copies spans of it."""
    text = " ".join(rng.sample(STORY, rng.randint(2, 4)))
    return list(lm.tokenizer(f"{text} {text}")["input_ids"])


def mixed_requests(lm: LoadedModel, count: int) -> list[tuple[list[int], SamplingParams, StoppingParams]]:
    rng = random.Random(11)
    kinds = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=5, temperature=0.7),
        SamplingParams(top_logprobs=3),
        SamplingParams(do_sample=True, seed=9, top_k=20, repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
    ]
    out = []
    for i in range(count):
        prompt = [
            [rng.randrange(3, lm.model.config.vocab_size)],
            repetitive_prompt(lm, rng),
            story_prompt(lm, rng),
        ][i % 3]
        new = rng.randint(6, 40)
        stopping = StoppingParams(new, min_new_tokens=min(new, 3) if i % 4 == 0 else 0)
        out.append((prompt, kinds[i % len(kinds)], stopping))
    return out


@pytest.mark.parametrize("attention_path", ["paged-kernel", "gathered"])
@torch.inference_mode()
def test_speculation_is_bitwise_the_same_as_without(lm: LoadedModel, attention_path: str) -> None:
    """Greedy, seeded sampling, penalties, top logprobs and min_new_tokens; requests batched with
    speculation on, alone without: the same ids, logprob bits, candidates, text and finish reason.
    Drafts were both accepted and rejected (so both paths ran). On the paged attention kernel (one
    call for every draft query) and on its fallback (gathered pages, one call per draft offset)."""
    requests = mixed_requests(lm, 12)
    rng = random.Random(3)
    attention.use_paged_kernel(attention_path == "paged-kernel")
    try:
        on, metrics = run(lm, requests, NGRAM, [rng.choice([0.0, 0.0, 0.01]) for _ in requests])
        off, plain = run(lm, requests, None, None)
    finally:
        attention.use_paged_kernel(True)
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        assert a == b, f"request {i} differs with speculation on"
    drafted = counter(metrics, "vllm:spec_decode_num_draft_tokens_total")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted < drafted, (accepted, drafted)
    assert counter(plain, "vllm:spec_decode_num_draft_tokens_total") == 0
    # Fewer forward passes for the same tokens: accepted drafts saved steps.
    steps_on = counter(metrics, "textgen_engine_steps_total")
    steps_off = counter(plain, "textgen_engine_steps_total")
    assert steps_on < steps_off, (steps_on, steps_off)


@torch.inference_mode()
def test_speculation_alone_matches_for_a_long_greedy_copy(lm: LoadedModel) -> None:
    """One long greedy request whose output copies its prompt: most drafts are accepted, and the
    output equals speculation off, bit for bit."""
    rng = random.Random(5)
    prompt = story_prompt(lm, rng) + repetitive_prompt(lm, rng) * 3
    requests = [(prompt, SamplingParams(top_logprobs=2), StoppingParams(60))]
    on, metrics = run(lm, requests, SpeculativeConfig(num_tokens=6), None)
    off, _ = run(lm, requests, None, None)
    assert on == off
    assert counter(metrics, "vllm:spec_decode_num_accepted_tokens_total") > 0


def test_speculation_is_off_where_verification_cannot_be_exact(tiny_gpt2_dir: Path) -> None:
    for options in ({"batch_invariant": False}, {"compact_forward": False}):
        lm = load_model(str(tiny_gpt2_dir), **options)  # type: ignore[arg-type]
        engine = Engine(
            lm,
            None,  # type: ignore[arg-type]
            max_batch_size=4,
            max_batch_tokens=4 * 512,
            max_prefill_tokens=512,
            max_queue=8,
            speculative=NGRAM,
        )
        assert engine.speculative is None, options


@torch.inference_mode()
def test_grammar_stop_strings_and_choices_stay_exact(stories260k_dir: Path) -> None:
    """A regex grammar (the matcher advances only on chosen tokens, never on drafts), stop strings
    (matched on the text as tokens are appended one by one) and n = 3 seeded choices of one prompt
    (as the OpenAI layer submits them): the same outputs with speculation on and off."""
    lm = load_model(str(stories260k_dir))
    grammar = GrammarCompiler(lm.tokenizer, lm.model.config.vocab_size, [lm.tokenizer.eos_token_id]).compile(
        GrammarSpec("regex", r"(Lily (and the dog )?(played|ran)\. ){2,8}")
    )
    prompt = list(lm.tokenizer(" ".join(STORY * 2))["input_ids"])
    requests: list[tuple[list[int], SamplingParams, StoppingParams]] = [
        (prompt, SamplingParams(), StoppingParams(40, stop=("ball.",))),
        (prompt, SamplingParams(top_logprobs=2), StoppingParams(40, stop=("dog", "fun"), include_stop=True)),
        *[
            (prompt, SamplingParams(do_sample=True, seed=100 + i, temperature=0.8), StoppingParams(30))
            for i in range(3)
        ],
    ]
    grammars = [None] * len(requests) + [grammar, grammar]
    requests += [
        (prompt, SamplingParams(), StoppingParams(60)),
        (prompt, SamplingParams(do_sample=True, seed=4), StoppingParams(60)),
    ]
    on, metrics = run(lm, requests, NGRAM, [0.0] * len(requests), grammars)
    off, _ = run(lm, requests, None, None, grammars)
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        assert a == b, f"request {i} differs with speculation on"
    assert counter(metrics, "vllm:spec_decode_num_accepted_tokens_total") > 0
    assert any(o[4] == "stop_sequence" for o in on), [o[4] for o in on]
    assert on[-2][3].startswith("Lily"), on[-2][3]


@torch.inference_mode()
def test_lora_rows_stay_exact(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Requests on an adapter (attention and the MLP's fused-activation layer adapted) and on the
    base, batched with speculation on, against each alone without it."""
    lm = load_model(str(tiny_gpt2_dir))
    registry = AdapterRegistry(lm.compact, lm.model_id, max_loras=2, max_rank=8)
    registry.load("a", build_adapter(tiny_gpt2_dir, tmp_path / "a", ["c_attn", "c_fc"], 4, seed=1))
    rng = random.Random(2)
    requests = [
        (
            repetitive_prompt(lm, rng),
            SamplingParams() if i % 2 else SamplingParams(do_sample=True, seed=i),
            StoppingParams(30),
        )
        for i in range(6)
    ]
    names: list[str | None] = ["a", "a", None, "a", None, "a"]
    on, metrics = run(lm, requests, NGRAM, [0.0] * len(requests), adapters=(registry, names))
    off, _ = run(lm, requests, None, None, adapters=(registry, names))
    for i, (a, b) in enumerate(zip(on, off, strict=True)):
        assert a == b, f"request {i} differs with speculation on"
    assert counter(metrics, "vllm:spec_decode_num_accepted_tokens_total") > 0
