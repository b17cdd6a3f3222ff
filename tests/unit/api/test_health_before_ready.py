"""/health and /ready answer 503 while the model loads, then 200 (in-process app, real model)."""

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.service import Service


def test_503_until_loaded(tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_load = Service.load

    def slow_load(self: Service) -> None:  # the real loader, started late
        gate.wait(30)
        real_load(self)

    monkeypatch.setattr(Service, "load", slow_load)
    app = create_app(Settings(model=str(tiny_gpt2_dir)))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        r = client.post("/generate", json={"inputs": "hi"})
        assert r.status_code == 503
        assert r.json()["error_type"] == "unavailable"
        gate.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
