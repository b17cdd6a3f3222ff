"""A forward pass that raises kills the engine loop: in-flight requests fail with the cause,
/health and /ready turn 503, and the cause is logged. (Fault injected into a real model.)"""

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def test_engine_death_fails_health(tiny_gpt2_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(model=str(tiny_gpt2_dir)))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert ok.status_code == 200
        engine = app.state.service.engine
        model = engine.loaded.compact or engine.model  # the forward the engine runs

        def broken_forward(*args: object, **kwargs: object) -> None:
            raise RuntimeError("simulated device failure")

        model.forward = broken_forward  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="textgen.engine"):
            failed = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert failed.status_code == 500
        assert "simulated device failure" in failed.json()["error"]
        assert client.get("/health").status_code == 503
        assert "simulated device failure" in client.get("/health").json()["detail"]
        assert client.get("/ready").status_code == 503
        after = client.post("/generate", json={"inputs": "hi"})
        assert after.status_code == 503 and "engine failed" in after.json()["error"]
        assert any("simulated device failure" in r.getMessage() for r in caplog.records)
