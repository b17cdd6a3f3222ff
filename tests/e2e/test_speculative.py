"""TEXTGEN_SPECULATIVE=ngram through real servers and the official OpenAI client: the same text,
token ids and logprobs as a server without speculation (greedy and seeded sampling), the
vLLM spec_decode counters moving, and /info naming the setting."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import run_server

MODEL = "stories"
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play with her ball. "
    "One day, Lily saw a big dog. The dog wanted to play with the ball too. "
)
ON = {
    "TEXTGEN_SERVED_MODEL_NAME": MODEL,
    "TEXTGEN_SPECULATIVE": "ngram",
    "TEXTGEN_SPECULATIVE_TOKENS": "5",
    "TEXTGEN_SPECULATIVE_NGRAM_MAX": "3",
}


def spec_counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name.startswith("vllm:spec_decode") and s.name.endswith("_total"):
                assert s.labels == {"model_name": MODEL}, s
                out[s.name] = s.value
    return out


def outputs(url: str) -> list[tuple[str, list[int | str], list[float]]]:
    """Greedy and seeded completions of a story told twice, with their tokens and logprobs."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    out = []
    for extra in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 7}, {"temperature": 1.0, "seed": 3}):
        r = client.completions.create(
            model=MODEL,
            prompt=STORY + STORY,
            max_tokens=48,
            logprobs=1,
            **extra,  # type: ignore[arg-type]
        )
        choice = r.choices[0]
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert len(choice.logprobs.token_logprobs) == r.usage.completion_tokens  # type: ignore[union-attr]
        out.append((choice.text, list(choice.logprobs.tokens or []), list(choice.logprobs.token_logprobs)))
    return out


def test_speculation_over_http_is_exact_and_counted(stories260k_dir: Path) -> None:
    with run_server(stories260k_dir, env=ON) as url:
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["speculative"] == {"method": "ngram", "num_tokens": 5, "ngram_min": 1, "ngram_max": 3}
        before = spec_counters(url)
        assert before == {
            "vllm:spec_decode_num_drafts_total": 0.0,
            "vllm:spec_decode_num_draft_tokens_total": 0.0,
            "vllm:spec_decode_num_accepted_tokens_total": 0.0,
        }
        with_spec = outputs(url)
        after = spec_counters(url)
    drafted = after["vllm:spec_decode_num_draft_tokens_total"]
    accepted = after["vllm:spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted <= drafted, after
    assert 0 < after["vllm:spec_decode_num_drafts_total"] <= drafted, after
    with run_server(stories260k_dir, env={"TEXTGEN_SERVED_MODEL_NAME": MODEL}) as url:
        assert httpx.get(f"{url}/info", timeout=10).json()["speculative"] is None
        without = outputs(url)
        assert spec_counters(url)["vllm:spec_decode_num_draft_tokens_total"] == 0
    assert with_spec == without


def test_ngram_bounds_are_checked(stories260k_dir: Path) -> None:
    """A min above the max stops startup, naming the setting."""
    env = {"TEXTGEN_SPECULATIVE": "ngram", "TEXTGEN_SPECULATIVE_NGRAM_MIN": "4", "TEXTGEN_SPECULATIVE_NGRAM_MAX": "2"}
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model", str(stories260k_dir), "--port", "0"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "TEXTGEN_SPECULATIVE_NGRAM_MIN" in r.stderr + r.stdout
