"""`textgen serve` as a user meets it: --help, and models that cannot be served."""

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings

CLI = [sys.executable, "-m", "app.cli"]


def test_serve_help_lists_every_setting() -> None:
    out = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out
        assert "TEXTGEN_" + name.upper() in out.replace("\n", "").replace(" ", "")


def _serve_fails(model: str, tmp_path: Path) -> str:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [*CLI, "serve", "--model", model, "--port", "0"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("textgen: error:")
    return last


def test_missing_directory(tmp_path: Path) -> None:
    line = _serve_fails(str(tmp_path / "nope"), tmp_path)
    assert "nope" in line


def test_unreachable_hub_id(tmp_path: Path) -> None:
    line = _serve_fails("someorg/some-model-that-is-not-cached", tmp_path)
    assert "someorg/some-model-that-is-not-cached" in line and "HF_HUB_OFFLINE" in line


def test_not_a_causal_lm(tmp_path: Path) -> None:
    from transformers import DistilBertConfig

    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37).save_pretrained(tmp_path / "bert")
    line = _serve_fails(str(tmp_path / "bert"), tmp_path)
    assert "not a causal language model" in line


@pytest.mark.parametrize("flag", ["--max-total-tokens=100000", "--device=cuda"])
def test_impossible_settings(tiny_gpt2_dir: Path, tmp_path: Path, flag: str) -> None:
    import torch

    if flag == "--device=cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [*CLI, "serve", "--model", str(tiny_gpt2_dir), "--port", "0", flag],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("textgen: error:")


def test_bad_flag_value() -> None:
    result = subprocess.run([*CLI, "serve", "--port", "-5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "port" in result.stderr and "Traceback" not in result.stderr


def test_torch_threads_beyond_the_ceiling_fail_at_startup() -> None:
    """torch takes any count and then segfaults in the first GEMM (100000 did on the 2-core CI
    machine): the setting is refused before anything starts, naming the variable."""
    for value in ("100000", "0"):
        env = {"PATH": "/usr/bin:/bin", "TEXTGEN_TORCH_THREADS": value}
        result = subprocess.run([*CLI, "serve", "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("textgen: error: invalid torch_threads") and "TEXTGEN_TORCH_THREADS" in last, last
