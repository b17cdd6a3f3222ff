"""A run killed mid-training resumes from its last complete checkpoint and ends as if never stopped."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.finetune.cli import main

from .helpers import ONE_THREAD_ENV, run_ok, tiny_args

STEPS = 100


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path) -> None:
    settings = ["--max-steps", str(STEPS), "--save-steps", "10", "--eval-split", "0.1"]
    straight = run_ok([*tiny_args(tiny_gpt2_dir, corpus_txt, tmp_path / "straight"), *settings])

    output = tmp_path / "killed"
    argv = [*tiny_args(tiny_gpt2_dir, corpus_txt, output), *settings]
    log = (tmp_path / "killed.log").open("w")
    env = {**os.environ, **ONE_THREAD_ENV}
    process = subprocess.Popen([sys.executable, "-m", "app.finetune", *argv], stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 120
    try:
        # Killed as soon as a second checkpoint exists: a real crash, possibly mid-save of the next.
        while not (output / "checkpoints" / "checkpoint-20").exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    assert not (output / "manifest.json").exists(), "the run finished before it could be killed"
    checkpoints = list((output / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "a complete checkpoint must survive the kill"
    for checkpoint in checkpoints:  # anything named like a checkpoint is whole; partial saves stay in STAGING
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
            assert (checkpoint / name).exists(), f"{checkpoint.name} lacks {name}"
    complete = [p.name for p in checkpoints]

    assert main([*argv, "--resume", "--seed", "7"]) == 2, "a resume must not silently change the training"

    resumed = run_ok([*argv, "--resume"])
    last = max(complete, key=lambda name: int(name.split("-")[1]))
    assert str(resumed["resumed_from"]).endswith(last)
    done_before = int(last.split("-")[1])
    assert resumed["steps_this_run"] == STEPS - done_before, "finished steps must not be trained again"
    assert resumed["global_step"] == straight["global_step"] == STEPS
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], abs=1e-4)
    assert resumed["eval_perplexity_after"] == pytest.approx(straight["eval_perplexity_after"], rel=1e-4)
    assert resumed["eval_perplexity_before"] == pytest.approx(straight["eval_perplexity_before"], rel=1e-6)
    assert main([*argv, "--resume"]) == 2, "a finished run has nothing to resume"
