"""Unmerged LoRA adapters in the compact forward: against the adapter merged into the base, and
batch invariance with adapters and base rows mixed in one batch.

Each adapter's greedy tokens, served unmerged in a batch mixing 3 adapters and the base, equal
those of the adapter merged into the base (peft's merge_and_unload) and run alone; the logprobs
agree to 5e-4 (other rounding: W + s*B@A against W and s*(x@A)@B). Base rows and adapter rows
are bitwise the same (`==` on ids and logprobs) alone and in the mixed batch.
"""

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from app.engine.core.types import GenerationRequest, SamplingParams, StoppingParams
from app.engine.engine import Engine
from app.engine.load.loader import LoadedModel, load_model
from app.engine.models.lora import (
    AdapterExistsError,
    AdapterLimitError,
    AdapterRefusedError,
    AdapterRegistry,
    UnknownAdapterError,
)
from tests.adapters import build_adapter, build_merged
from tests.unit.engine.completions import Completions

# Per family: three adapters' (target modules, rank). GPT-2's are Conv1D (fan_in_fan_out); the
# third of each adapts an MLP layer whose activation is fused into the base GEMM.
TARGETS = {
    "tiny-gpt2": [(["c_attn"], 4), (["c_attn", "c_proj"], 8), (["c_fc"], 2)],
    "stories260k": [(["q_proj", "v_proj"], 4), (["k_proj", "o_proj", "down_proj"], 8), (["gate_proj", "up_proj"], 2)],
}
LOGPROB_TOLERANCE = 5e-4  # measured up to 1.8e-4 on stories260k, 2026-11-30


class Family:
    def __init__(self, name: str, base: Path, tmp: Path) -> None:
        self.name = name
        self.base = base
        self.adapters = [
            build_adapter(base, tmp / f"adapter{i}", targets, rank, seed=10 + i)
            for i, (targets, rank) in enumerate(TARGETS[name])
        ]
        self.merged = [build_merged(base, a, tmp / f"merged{i}") for i, a in enumerate(self.adapters)]


@pytest.fixture(scope="module", params=["tiny-gpt2", "stories260k"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    base: Path = request.getfixturevalue("tiny_gpt2_dir" if request.param == "tiny-gpt2" else "stories260k_dir")
    return Family(request.param, base, tmp_path_factory.mktemp(f"lora-{request.param}"))


def engine_for(lm: LoadedModel, adapters: dict[str, Path], prefix_cache_tokens: int = 0) -> Engine:
    registry = AdapterRegistry(lm.compact, lm.model_id, max_loras=8, max_rank=64)
    for name, path in adapters.items():
        registry.load(name, path)
    return Engine(
        lm,
        None,  # type: ignore[arg-type]  # no embedding requests here
        max_batch_size=64,
        max_batch_tokens=64 * 512,
        max_prefill_tokens=4096,
        max_queue=128,
        adapters=registry,
        prefix_cache_tokens=prefix_cache_tokens,
    )


Result = tuple[list[int], list[float]]


def run(engine: Engine, requests: list[tuple[list[int], str | None]], new: int = 16) -> list[Result]:
    """Submit all `requests` (prompt, adapter) at once; return each one's greedy (ids, logprobs)."""
    completions = Completions(len(requests))
    for i, (ids, adapter) in enumerate(requests):
        engine.submit(
            GenerationRequest(ids, SamplingParams(), StoppingParams(new, new), completions.on_event(i), adapter=adapter)
        )
    completions.wait_all()
    results = []
    for i in range(len(requests)):
        c = completions.done[i]
        assert c.error is None, c.error
        results.append(([t.id for t in c.tokens], [t.logprob for t in c.tokens]))
    return results


def alone(lm: LoadedModel, adapters: dict[str, Path], requests: list[tuple[list[int], str | None]]) -> list[Result]:
    engine = engine_for(lm, adapters)
    engine.start()
    try:
        return [run(engine, [r])[0] for r in requests]
    finally:
        engine.stop()


def prompts(lm: LoadedModel, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = lm.model.config.vocab_size
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))] for _ in range(count)]


@torch.inference_mode()
def test_mixed_batch_matches_merged_adapters_and_is_batch_invariant(family: Family) -> None:
    lm = load_model(str(family.base))
    names = {f"a{i}": path for i, path in enumerate(family.adapters)}
    # 12 requests: each adapter and the base three times, interleaved in one batch.
    choices: list[str | None] = [None, "a0", "a1", "a2"] * 3
    requests = list(zip(prompts(lm, len(choices), seed=3), choices, strict=True))
    engine = engine_for(lm, names)
    engine.start()
    try:
        mixed = run(engine, requests)
    finally:
        engine.stop()
    solo = alone(lm, names, requests)
    base_alone = alone(load_model(str(family.base)), {}, [(p, None) for p, a in requests if a is None])
    for i, (m, s) in enumerate(zip(mixed, solo, strict=True)):
        assert m[0] == s[0], f"request {i} ({choices[i]}): token ids differ alone and in the mixed batch"
        assert m[1] == s[1], f"request {i} ({choices[i]}): logprobs differ alone and in the mixed batch"
    base_mixed = [m for m, a in zip(mixed, choices, strict=True) if a is None]
    assert base_mixed == base_alone, "base rows changed beside adapter rows"
    for k, merged_dir in enumerate(family.merged):
        merged = alone(load_model(str(merged_dir)), {}, [(p, None) for p, a in requests if a == f"a{k}"])
        served = [m for m, a in zip(mixed, choices, strict=True) if a == f"a{k}"]
        base_same_prompts = [
            s for s, (p, a) in zip(solo, requests, strict=True) if a == f"a{k}"
        ]  # adapter rows run alone
        for (ids, lps), (ref_ids, ref_lps) in zip(served, merged, strict=True):
            assert ids == ref_ids, f"adapter a{k}: greedy tokens differ from the merged model"
            assert max(abs(x - y) for x, y in zip(lps, ref_lps, strict=True)) <= LOGPROB_TOLERANCE
        assert served == base_same_prompts
    # Each adapter changes the output (else the comparison above would prove nothing).
    plain = alone(load_model(str(family.base)), {}, [(p, None) for p, _ in requests])
    for k in range(3):
        rows = [i for i, a in enumerate(choices) if a == f"a{k}"]
        assert any(mixed[i][0] != plain[i][0] for i in rows), f"adapter a{k} left every output unchanged"


def test_registry_refusals_and_unload_waits(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    lm = load_model(str(tiny_gpt2_dir))
    adapter = build_adapter(tiny_gpt2_dir, tmp_path / "a", ["c_attn"], 16, seed=1)
    registry = AdapterRegistry(lm.compact, lm.model_id, max_loras=1, max_rank=8)
    with pytest.raises(AdapterRefusedError, match="rank 16, above the ceiling TEXTGEN_MAX_LORA_RANK=8"):
        registry.load("a", adapter)
    registry.max_rank = 16
    registry.load("a", adapter)
    with pytest.raises(AdapterExistsError, match="already loaded"):
        registry.load("a", adapter)
    with pytest.raises(AdapterLimitError, match="TEXTGEN_MAX_LORAS"):
        registry.load("b", adapter)
    with pytest.raises(UnknownAdapterError, match="'nope' does not exist"):
        registry.acquire("nope")
    held = registry.acquire("a")
    with pytest.raises(TimeoutError, match="1 requests in flight"):
        registry.unload("a", timeout=0.05)
    with pytest.raises(UnknownAdapterError):  # unloading: no new requests
        registry.acquire("a")
    unloaded = threading.Event()
    worker = threading.Thread(target=lambda: (registry.unload("a", timeout=10), unloaded.set()))
    worker.start()
    assert not unloaded.wait(0.2), "unload returned while a request still held the adapter"
    registry.release(held)
    worker.join(10)
    assert unloaded.is_set() and registry.names() == []


def test_refuses_an_adapter_for_another_base(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import build_tiny_gpt2

    lm = load_model(str(tiny_gpt2_dir))
    registry = AdapterRegistry(lm.compact, lm.model_id, max_loras=4, max_rank=64)
    other = build_tiny_gpt2(tmp_path / "other", n_positions=64)
    # A wider model: same module names, other shapes.
    from transformers import GPT2Config, GPT2LMHeadModel

    wide = tmp_path / "wide"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(wide)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(other).save_pretrained(wide)
    wrong = build_adapter(wide, tmp_path / "wrong", ["c_attn"], 4, seed=2)
    with pytest.raises(AdapterRefusedError, match=r"does not fit the base model .*attn.c_attn.*takes \[192, 64\]"):
        registry.load("wrong", wrong)
    deeper = tmp_path / "deeper"  # the base's shapes, one more layer
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=3, n_head=4)).save_pretrained(deeper)
    AutoTokenizer.from_pretrained(other).save_pretrained(deeper)
    extra = build_adapter(deeper, tmp_path / "extra", ["c_attn"], 4, seed=2)
    with pytest.raises(AdapterRefusedError, match="targets module 'transformer.h.2.attn.c_attn'"):
        registry.load("extra", extra)
    with pytest.raises(AdapterRefusedError, match="not a PEFT adapter directory"):
        registry.load("none", tmp_path)
    assert registry.names() == []


def test_transformers_forward_refuses_unmerged_adapters(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    lm = load_model(str(tiny_gpt2_dir), compact_forward=False)
    registry = AdapterRegistry(lm.compact, lm.model_id, max_loras=4, max_rank=64)
    adapter = build_adapter(tiny_gpt2_dir, tmp_path / "a", ["c_attn"], 4, seed=1)
    with pytest.raises(AdapterRefusedError, match="need the compact forward .* merge one adapter with --adapter"):
        registry.load("a", adapter)


def test_lora_adapters_setting_is_parsed_strictly() -> None:
    from app.config import Settings

    assert Settings(lora_adapters=" a=/x/a , b=rel/b ,").lora_adapter_map() == {"a": "/x/a", "b": "rel/b"}
    for bad in ("a", "=x", "a=", "a=/x,a=/y"):
        with pytest.raises(ValueError, match="TEXTGEN_LORA_ADAPTERS"):
            Settings(lora_adapters=bad).lora_adapter_map()


@torch.inference_mode()
def test_the_prefix_cache_never_gives_an_adapter_the_base_models_kv(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """The same 40-token prompt, first on the base (its blocks get cached), then on an adapter:
    the adapter's output must equal its run with no cache at all."""
    adapter = build_adapter(tiny_gpt2_dir, tmp_path / "a", ["c_attn"], 4, seed=5)
    lm = load_model(str(tiny_gpt2_dir))
    prompt = prompts(lm, 1, seed=9)[0] * 4
    prompt = (prompt * 40)[:40]

    cached = engine_for(lm, {"a": adapter}, prefix_cache_tokens=512)
    cached.start()
    try:
        base_first = run(cached, [(prompt, None)])[0]
        with_cache = run(cached, [(prompt, "a")])[0]
        assert cached.prefix is not None and len(cached.prefix) > 0, "the base prompt's blocks were not cached"
    finally:
        cached.stop()
    plain = engine_for(lm, {"a": adapter})
    plain.start()
    try:
        without = run(plain, [(prompt, "a")])[0]
    finally:
        plain.stop()
    assert with_cache == without
    assert with_cache != base_first, "the adapter changed nothing, so the check above proves nothing"


def _broken_copy(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of adapter `src` at `dst`, its adapter_config.json updated with `config`, its
    tensors replaced by `tensors(original)` when given."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        file = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(file)), file)
    return dst


def test_broken_adapter_files_are_refused_naming_the_problem(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Each of these was a 500 (SafetensorError, TypeError) or was served wrongly (a config r that
    is not the tensors' rank, NaN weights answering empty tokens) before it was refused."""
    lm = load_model(str(tiny_gpt2_dir))
    registry = AdapterRegistry(lm.compact, lm.model_id, max_loras=8, max_rank=64)
    good = build_adapter(tiny_gpt2_dir, tmp_path / "good", ["c_attn"], 4, seed=1)

    def first_b(t: dict[str, torch.Tensor], value: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        key = next(k for k in sorted(t) if "lora_B" in k)
        t[key] = value if value is not None else t[key].clone().fill_(float("nan"))
        return t

    corrupt = _broken_copy(good, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    no_weights = _broken_copy(good, tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases = {
        "corrupt": (corrupt, "cannot read the weights of adapter 'corrupt'"),
        "no-weights": (no_weights, "has no weights: .* holds neither adapter_model.safetensors nor adapter_model.bin"),
        "r0": (_broken_copy(good, tmp_path / "r0", {"r": 0}), r"r=0 in adapter_config.json; it must be an integer"),
        "r-text": (_broken_copy(good, tmp_path / "r-text", {"r": "4"}), r"r='4' in adapter_config.json"),
        "r8": (_broken_copy(good, tmp_path / "r8", {"r": 8}), r"rank 4 at .* but r=8 in adapter_config.json"),
        "alpha": (_broken_copy(good, tmp_path / "alpha", {"lora_alpha": "abc"}), "lora_alpha='abc'.*must be a number"),
        "nan": (_broken_copy(good, tmp_path / "nan", tensors=first_b), "NaN or infinite weights at 'transformer.h.0"),
        "inner": (
            _broken_copy(good, tmp_path / "inner", tensors=lambda t: first_b(t, torch.zeros(192, 3))),
            r"lora_B \[192, 3\] and lora_A \[4, 64\] at .* do not multiply",
        ),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(AdapterRefusedError, match=message):
            registry.load(name, path)
    assert registry.names() == [] and len(registry) == 0
    registry.load("good", good)  # the source of every broken copy loads
    assert registry.names() == ["good"]


def test_concurrent_unloads_of_one_adapter_remove_it_once(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Two unloads waiting on the same in-flight request: one succeeds and reports the unload, the
    other finds no such adapter. Both succeeding drove `textgen_lora_adapters_loaded` negative,
    and the late one could report the unload of a new adapter loaded under the name meanwhile."""
    events: list[str] = []
    lm = load_model(str(tiny_gpt2_dir))
    registry = AdapterRegistry(
        lm.compact, lm.model_id, max_loras=4, max_rank=64, on_change=lambda e, n, s: events.append(f"{e} {n}")
    )
    path = build_adapter(tiny_gpt2_dir, tmp_path / "a", ["c_attn"], 4, seed=1)
    registry.load("a", path)
    held = registry.acquire("a")
    outcomes: list[str] = []

    def unload() -> None:
        try:
            registry.unload("a", timeout=20)
            outcomes.append("ok")
        except UnknownAdapterError:
            outcomes.append("unknown")

    workers = [threading.Thread(target=unload) for _ in range(2)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 5
    while not held.unloading and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # both unloads are waiting on the held request
    registry.release(held)
    for w in workers:
        w.join(20)
    assert sorted(outcomes) == ["ok", "unknown"]
    assert events == ["load a", "unload a"]
    assert registry.names() == []
