"""TEXTGEN_COMPILE through a real server: /info says what is compiled, and greedy output is the
model's own greedy continuation (transformers' generate)."""

from pathlib import Path

import httpx

from app.engine.load.loader import load_model
from tests.e2e.server import run_server
from tests.unit.engine.test_engine import greedy_alone


def test_a_compiled_server_reports_its_graphs_and_generates_greedy_text(tiny_gpt2_dir: Path) -> None:
    lm = load_model(str(tiny_gpt2_dir))
    prompts = ["def parse(text):", "The module", "import os\nimport sys\n"]
    with run_server(tiny_gpt2_dir, env={"TEXTGEN_COMPILE": "true"}) as url:
        info = httpx.get(f"{url}/info", timeout=10).json()
        compiled = info["compile"]
        assert compiled["enabled"] is True and compiled["backend"] == "inductor", compiled
        assert compiled["graphs"] == ["decode, any rows and KV width"]
        assert compiled["warmup_seconds"] > 0
        for prompt in prompts:
            body = {
                "inputs": prompt,
                "parameters": {"max_new_tokens": 12, "details": True, "decoder_input_details": False},
            }
            out = httpx.post(f"{url}/generate", json=body, timeout=60).json()
            ids = lm.tokenizer(prompt)["input_ids"]
            want = greedy_alone(lm, ids, len(out["details"]["tokens"]))
            assert [t["id"] for t in out["details"]["tokens"]] == want, prompt


def test_info_says_compile_is_off_by_default(tiny_gpt2_dir: Path) -> None:
    with run_server(tiny_gpt2_dir) as url:
        assert httpx.get(f"{url}/info", timeout=10).json()["compile"] == {"enabled": False}
