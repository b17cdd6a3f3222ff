"""/health, /ready and the API while the demo model builds: 503 with the build's progress."""

import json
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.demo_model import DemoBuild
from app.main import create_app


def test_building_shape(tmp_path: Path) -> None:
    app = create_app(Settings(model="unused"))
    build = DemoBuild(output=tmp_path / "demo")
    app.state.service.build = build  # as Service.load sets it while the child runs
    client = TestClient(app)  # no lifespan: nothing loads

    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "building"
    assert r.json()["progress"]["phase"] == "starting"  # the child has not written anything yet

    build.progress_file.write_text(json.dumps({"phase": "training", "step": 100, "total_steps": 400, "training_s": 20}))
    r = client.get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "building"
    progress = body["progress"]
    assert set(progress) == {"phase", "step", "total_steps", "fraction", "elapsed_s", "eta_s"}
    assert (progress["phase"], progress["step"], progress["total_steps"]) == ("training", 100, 400)
    assert progress["fraction"] == 0.25
    assert progress["eta_s"] == 60.0  # 0.2 s per step, 300 steps left
    assert r.headers["retry-after"] == "60"  # the build's estimate (under load it can be exceeded)
    api = client.post("/v1/completions", json={"model": "x", "prompt": "hi"})
    assert api.status_code == 503 and api.headers["retry-after"] == "60"
    assert "step 100 of 400" in body["detail"]

    build.progress_file.write_text(json.dumps({"phase": "saving", "step": 400, "total_steps": 400, "training_s": 80}))
    assert client.get("/health").json()["progress"]["fraction"] == 1.0
    assert client.get("/ready").json() == {"status": "unavailable", "detail": "building the demo model"}
    assert client.post("/generate", json={"inputs": "hi"}).status_code == 503

    app.state.service.build = None
    assert client.get("/health").json() == {"status": "unavailable", "detail": "loading model"}
