"""A request that can never fit the KV budget is refused with 413 naming the setting, in TGI's and
OpenAI's error shapes, and the engine goes on (in-process app, real model)."""

import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_a_request_over_the_kv_budget_gets_413(tiny_gpt2_dir: Path) -> None:
    app = create_app(
        Settings(model=str(tiny_gpt2_dir), max_batch_tokens=200)
    )  # a 22-token reservation holds 64 columns (whole attention chunks)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        big = client.post("/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 150}})
        assert big.status_code == 413
        assert big.json()["error_type"] == "payload_too_large"
        assert "TEXTGEN_MAX_BATCH_TOKENS=200" in big.json()["error"]
        model = client.get("/v1/models").json()["data"][0]["id"]
        openai = client.post("/v1/completions", json={"model": model, "prompt": "The list", "max_tokens": 150})
        assert openai.status_code == 413
        assert openai.json()["error"]["type"] == "invalid_request_error"
        small = client.post("/generate", json={"inputs": "The list", "parameters": {"max_new_tokens": 20}})
        assert small.status_code == 200
        assert app.state.service.engine.alive
