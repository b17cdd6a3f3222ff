"""What `textgen finetune` exports, `textgen serve` serves: the merged model, and base + adapter."""

import json
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


@pytest.mark.slow
def test_finetune_serve_to_loads_the_adapter_into_a_running_server(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.finetune.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(synthetic_lines(400)) + "\n")
    root = tmp_path / "adapters"
    root.mkdir()
    common = ["--lora", "--no-merge", "--learning-rate", "1e-2", "--max-steps", "10", "--eval-split", "0"]
    env = {"TEXTGEN_ALLOW_RUNTIME_LORA": "true", "TEXTGEN_LORA_ROOT": str(root), "TEXTGEN_API_KEY": "ft-key"}
    with run_server(tiny_gpt2_dir, env=env) as url:
        auth = {"Authorization": "Bearer ft-key"}
        monkeypatch.setenv("TEXTGEN_API_KEY", "ft-key")
        run_ok([*tiny_args(tiny_gpt2_dir, data, root / "owl"), *common, "--serve-to", url, "--name", "owl"])
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"]
        assert [m["id"] for m in models if m["parent"]] == ["owl"]
        body = {"inputs": "the green owl", "parameters": {"max_new_tokens": 8}}
        tuned = httpx.post(
            f"{url}/generate",
            json={**body, "parameters": {**body["parameters"], "adapter_id": "owl"}},
            headers=auth,
            timeout=60,
        )
        base = httpx.post(f"{url}/generate", json=body, headers=auth, timeout=60)
        assert tuned.status_code == base.status_code == 200, tuned.text
        assert tuned.json()["generated_text"] != base.json()["generated_text"], "the trained adapter changed nothing"

        # Without --serve-to: the one-line curl, which loads it when run.
        capsys.readouterr()
        run_ok([*tiny_args(tiny_gpt2_dir, data, root / "owl2"), *common])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("curl -sS -X POST http://127.0.0.1:8000/v1/load_lora_adapter") and '"owl2"' in line
        import shlex

        payload = json.loads(shlex.split(line)[-1])
        assert payload == {"lora_name": "owl2", "lora_path": str((root / "owl2").resolve())}

        # A refusal is reported with the server's reason, and the exit status says so.
        code = main([*tiny_args(tiny_gpt2_dir, data, tmp_path / "outside"), *common, "--serve-to", url, "--name", "x"])
        assert code == 2
        err = capsys.readouterr().err
        assert "refused to load it (400)" in err and "must lie under TEXTGEN_LORA_ROOT" in err, err
