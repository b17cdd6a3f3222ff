"""Issue 21: in every precision mode the server calls batch-invariant, 32 prompts sent together give
each prompt the token ids and logprobs it gets sent alone (TGI's route, huggingface_hub's client).

The model is a 384-wide random GPT-2 (MLP 1536), where oneDNN's lone bf16 row took another kernel
than batched rows: bf16 changed the logprobs of 4 of these 32 prompts before bf16 GEMMs were padded
to 2 rows."""

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import InferenceClient, constants

from tests.e2e.server import Server, start, stop
from tests.unit.engine.test_quantize import build_mid_gpt2

MODES = {
    "float32": {},
    "bfloat16": {"TEXTGEN_DTYPE": "bfloat16", "TEXTGEN_KV_CACHE_DTYPE": "bfloat16"},
    "int8-weight-only": {"TEXTGEN_QUANTIZE": "int8-weight-only"},
    "int4-weight-only": {"TEXTGEN_QUANTIZE": "int4-weight-only"},
    "int8-dynamic": {"TEXTGEN_QUANTIZE": "int8-dynamic"},
}


@pytest.fixture(autouse=True)
def _allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session runs with HF_HUB_OFFLINE=1 (no hub here), which also blocks the client's
    # requests to our own server on 127.0.0.1.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def mid_gpt2(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mid_gpt2(tmp_path_factory.mktemp("mid-gpt2"), tiny_gpt2_dir)


@pytest.fixture(params=list(MODES))
def server(request: pytest.FixtureRequest, mid_gpt2: Path, tmp_path: Path) -> Iterator[tuple[str, Server]]:
    # A generous start: five servers in a row on a shared 2-core machine.
    srv = start(mid_gpt2, env=MODES[request.param], log_dir=tmp_path, timeout=300)
    try:
        yield request.param, srv
    finally:
        stop(srv.process)


def _prompts() -> list[str]:
    rng = random.Random(21)
    words = "the list of tuples returns a new object with keys and values from each module in python".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(32)]


@pytest.mark.timeout(900)  # 64 requests; int8-dynamic runs eagerly at ~1/3 of fp32's speed on a shared machine
def test_thirty_two_prompts_together_equal_each_alone(server: tuple[str, Server]) -> None:
    mode, srv = server
    assert "batch-invariant: true" in srv.log(), srv.log()[-2000:]
    client = InferenceClient(base_url=srv.url, timeout=120)

    def run(prompt: str) -> tuple[list[int], list[float]]:
        out = client.text_generation(prompt, max_new_tokens=8, details=True)
        assert out.details is not None
        return [t.id for t in out.details.tokens], [t.logprob for t in out.details.tokens]

    prompts = _prompts()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    alone = [run(p) for p in prompts]
    for i, (t, a) in enumerate(zip(together, alone, strict=True)):
        assert t[0] == a[0], f"{mode}, prompt {i}: token ids differ"
        assert t[1] == a[1], f"{mode}, prompt {i}: logprobs differ"
