"""Two processes on the gloo backend, as `torchrun` runs them: DDP trains, rank 0 alone writes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ONE_THREAD_ENV, read_json, tiny_args


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_gloo_run(tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path) -> None:
    output = tmp_path / "ddp"
    argv = [*tiny_args(tiny_gpt2_dir, corpus_txt, output), "--max-steps", "6", "--save-steps", "3",
            "--keep-checkpoints"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "app.finetune", *argv]  # fmt: skip
    env = {**os.environ, **ONE_THREAD_ENV}  # two ranks share two cores
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = read_json(output / "metrics.json")
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 6
    assert metrics["eval_perplexity_after"] < metrics["eval_perplexity_before"]
    checkpoint = output / "checkpoints" / "checkpoint-6"
    # Each rank saves its own RNG state into the shared checkpoint; everything else is rank 0's.
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    assert (output / "model.safetensors").exists() and (output / "manifest.json").exists()
    assert result.stderr.count("wrote ") == 1, "only rank 0 exports"
    assert not list(output.glob(".*")), "no staging leftovers"
