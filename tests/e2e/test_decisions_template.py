"""`textgen finetune --task decisions --chat-template FILE` renders the training prompts with the
template a server is started with (TEXTGEN_CHAT_TEMPLATE), records the template's hash in
decisions.json, and the server refuses (400 naming `model`) an adapter whose recorded template is
not the one it renders with. A short run on stories260k, asked through the official `openai` SDK."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.decisions_data import QUESTION, held_out_set, train_set, write_jsonl
from tests.e2e.server import Server, start, stop

TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
FLAGS = ["--lora", "--no-merge", "--eval-split", "0.2", "--max-steps", "3", "--batch-size", "8", "--logging-steps", "1"]


@pytest.fixture(scope="module")
def adapters(stories260k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One adapter trained with --chat-template, and a copy that says it was trained without one."""
    root = tmp_path_factory.mktemp("decisions-template")
    template = root / "chat.jinja"
    template.write_text(TEMPLATE)
    data = write_jsonl(root / "train.jsonl", train_set()[:60])
    out = root / "templated"
    command = [
        sys.executable, "-m", "app.cli", "finetune", "--task", "decisions", "--model", str(stories260k_dir),
        "--data", str(data), "--output", str(out), "--chat-template", str(template), *FLAGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prompt format: chat template" in run.stderr, run.stderr[-2000:]  # stories260k has none of its own
    calibration = json.loads((out / "decisions.json").read_text())
    assert calibration["chat_template_sha256"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    plain = root / "plain"
    shutil.copytree(out, plain)
    (plain / "decisions.json").write_text(json.dumps(calibration | {"chat_template_sha256": None}))
    return out, plain


@pytest.fixture(scope="module")
def server(
    stories260k_dir: Path, adapters: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    templated, plain = adapters
    logs = tmp_path_factory.mktemp("logs")
    (logs / "chat.jinja").write_text(TEMPLATE)  # the same text, another file
    env = {
        "TEXTGEN_CHAT_TEMPLATE": str(logs / "chat.jinja"),
        "TEXTGEN_LORA_ADAPTERS": f"templated={templated},plain={plain}",
        "TEXTGEN_MAX_LORA_RANK": "16",
    }
    srv = start(stories260k_dir, env=env, log_dir=logs)
    yield srv
    stop(srv.process)


def test_the_adapter_is_served_with_its_template_and_refused_with_another(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
    text = held_out_set()[0][0]
    answer = client.decisions.create(model="templated", input=text, questions=[QUESTION]).answers[0]
    assert answer.type == "choice"
    with pytest.raises(openai.BadRequestError) as caught:
        client.decisions.create(model="plain", input=text, questions=[QUESTION])
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "model", error
    assert "no chat template" in error["message"] and "--chat-template" in error["message"], error
