"""`textgen finetune --task decisions` makes a classifier: a LoRA adapter trained on synthetic
customer messages (tests/decisions_data.py) routed to 3 departments, on stories260k, hot-loaded
into a running `textgen serve` with --serve-to and asked through the official `openai` SDK. On
held-out messages with other items and other phrasings it must reach accuracy >= 0.85 and beat
the base model by >= 0.30, and the server must apply the calibrated temperature it saved."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.decisions_data import QUESTION, held_out_set, train_set, write_jsonl
from tests.e2e.server import Server, start, stop

# The run below: ~1.5 min on 2 busy shared cores (one torch thread: a 260K-parameter model is
# faster on one than on two contended ones).
TRAIN_FLAGS = [
    "--lora", "--no-merge", "--eval-split", "0.2", "--max-steps", "100", "--batch-size", "16",
    "--learning-rate", "4e-3", "--lora-rank", "16", "--lora-dropout", "0", "--logging-steps", "20",
    "--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def server(stories260k_dir: Path, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"TEXTGEN_ALLOW_RUNTIME_LORA": "true", "TEXTGEN_LORA_ROOT": str(root), "TEXTGEN_MAX_LORA_RANK": "16"}
    srv = start(stories260k_dir, env=env, log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    stop(srv.process)


def accuracy(client: openai.OpenAI, model: str) -> float:
    """Accuracy on the held-out messages (8 requests in flight)."""

    def right(item: tuple[str, str]) -> bool:
        answer = client.decisions.create(model=model, input=item[0], questions=[QUESTION]).answers[0]
        assert answer.type == "choice"
        return answer.choice == item[1]

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(right, held_out_set())) / len(held_out_set())


@pytest.mark.timeout(1200)  # training (~1.5 min) + 108 decisions, on a busy 2-core machine
def test_a_finetuned_adapter_routes_held_out_messages(
    server: Server, stories260k_dir: Path, root: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", train_set())
    out = root / "router"
    command = [
        sys.executable, "-m", "app.cli", "finetune", "--task", "decisions", "--model", str(stories260k_dir),
        "--data", str(data), "--output", str(out), *TRAIN_FLAGS, "--serve-to", server.url, "--name", "router",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stderr
    assert "before: validation accuracy" in log and "after: validation accuracy" in log, log[-2000:]
    assert "calibrated: temperature" in log and "step 100/100" in log
    calibration = json.loads((out / "decisions.json").read_text())
    temperature = calibration["temperature"]
    assert 0 < temperature and calibration["eval_ece_calibrated"] <= calibration["eval_ece_after"] + 1e-9

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    assert "router" in [m.id for m in client.models.list().data], "--serve-to loaded the adapter"
    base_model = client.models.list().data[0].id
    base = accuracy(client, base_model)
    tuned = accuracy(client, "router")
    print(f"held-out accuracy: base {base:.3f}, fine-tuned {tuned:.3f}; temperature {temperature:.3f}")
    assert tuned >= 0.85, f"fine-tuned accuracy {tuned:.3f}"
    assert tuned >= base + 0.30, f"base {base:.3f}, fine-tuned {tuned:.3f}"

    # The server divides the option sums by the saved temperature: same answer, other confidence.
    (out / "decisions.json").write_text(json.dumps({"temperature": 1.0}))
    text = held_out_set()[0][0]
    raw = client.decisions.create(model="router", input=text, questions=[QUESTION]).answers[0]
    (out / "decisions.json").write_text(json.dumps(calibration))
    scaled = client.decisions.create(model="router", input=text, questions=[QUESTION]).answers[0]
    assert raw.type == scaled.type == "choice"
    logits = [math.log(p.probability) for p in raw.probabilities]
    expected = [math.exp(x / temperature) for x in logits]
    expected = [x / sum(expected) for x in expected]
    assert [p.probability for p in scaled.probabilities] == pytest.approx(expected, rel=1e-6, abs=1e-9)
