"""What `textgen finetune` exports, `textgen serve` serves: the merged model, and base + adapter."""

from pathlib import Path

import httpx
import pytest

from tests.e2e.server import run_server
from tests.unit.finetune.helpers import run_ok, synthetic_lines, tiny_args

REQUEST = {"inputs": "the green owl", "parameters": {"max_new_tokens": 8}}


def _generate(url: str) -> str:
    response = httpx.post(f"{url}/generate", json=REQUEST, timeout=60)
    assert response.status_code == 200, response.text
    text = response.json()["generated_text"]
    assert isinstance(text, str) and text
    return text


@pytest.mark.slow
def test_finetuned_model_and_adapter_are_served(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(synthetic_lines(400)) + "\n")
    common = ["--lora", "--learning-rate", "1e-2", "--max-steps", "10", "--eval-split", "0"]
    run_ok([*tiny_args(tiny_gpt2_dir, data, tmp_path / "merged"), *common])
    run_ok([*tiny_args(tiny_gpt2_dir, data, tmp_path / "adapter"), *common, "--no-merge"])

    with run_server(tmp_path / "merged") as url:
        merged = _generate(url)
    with run_server(tiny_gpt2_dir, args=["--adapter", str(tmp_path / "adapter")]) as url:
        adapted = _generate(url)
    # The fixture's peaked logits leave greedy decoding no near-ties, so the two must agree exactly.
    assert adapted == merged
