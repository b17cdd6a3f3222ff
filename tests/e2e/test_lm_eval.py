"""lm-evaluation-harness (`local-completions`) scores a running `textgen serve` exactly as it
scores an in-process reference that runs the model on the same token ids: accuracy equal,
perplexity within 1e-4 relative. Tasks are local JSON (tests/e2e/lm_eval_tasks), offline."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from tests.e2e.reference_server import reference_server
from tests.e2e.server import run_server

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval[api] is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "e2e" / "lm_eval_tasks"


def evaluate(base_url: str, tokenizer: Path, model_name: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {
        "model": model_name,
        "base_url": f"{base_url}/completions",
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_length": 256,
        "num_concurrent": 1,
        "max_retries": 1,
    }
    out = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["textgen_mc", "textgen_rolling"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=False,
    )
    return out["results"]


def build_gpt2(tokenizer_dir: Path, out: Path) -> Path:
    """A small random GPT-2 over the real GPT-2 tokenizer (peaked logits: no near-ties)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    config.bos_token_id = config.eos_token_id = eos
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(params=["stories260k", "gpt2-tokenizer"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "stories260k":
        return request.getfixturevalue("stories260k_dir")
    return build_gpt2(request.getfixturevalue("gpt2_tokenizer_dir"), tmp_path_factory.mktemp("gpt2-random"))


def test_harness_scores_served_model_as_in_process(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", os.environ.get("OPENAI_API_KEY", "unused"))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with reference_server(model) as ref_url:
        expected = evaluate(ref_url, model_dir, "reference")
    with run_server(model_dir) as url:
        name = __import__("httpx").get(f"{url}/v1/models").json()["data"][0]["id"]
        got = evaluate(f"{url}/v1", model_dir, name)
    assert got["textgen_mc"]["acc,none"] == expected["textgen_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert got["textgen_rolling"][metric] == pytest.approx(expected["textgen_rolling"][metric], rel=1e-4)
    # The scores are real: better than chance would be for stories260k, finite perplexity for both.
    assert 1 < got["textgen_rolling"]["word_perplexity,none"] < float("inf")
