"""The offline demo model, seen from the server: build it once in a child process (the server never
imports the trainer) while the server already listens, and report how far the build has got.

The child is `python -m app.finetune.demo --output DIR --progress FILE`; FILE holds
`{"phase", "step", "total_steps", "training_s"}` (see app/finetune/demo.py).
"""

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.config import demo_model_dir

log = logging.getLogger("textgen")


class DemoBuildError(Exception):
    """The build child failed or was stopped."""


def demo_model_ready(path: Path | None = None) -> bool:
    return ((path or demo_model_dir()) / "config.json").exists()


@dataclass(frozen=True)
class BuildProgress:
    """One reading of the build's progress, as /health reports it.

    phase: "starting" (the child is importing), "preparing" (tokenizer and data), "training",
    "saving". fraction: 0..1, the share of training steps done (0 before training, 1 when saving).
    elapsed_s: seconds since the build started. eta_s: seconds left, estimated from the step rate
    (None until a few steps have run)."""

    phase: str
    step: int
    total_steps: int
    elapsed_s: float
    eta_s: float | None

    @property
    def fraction(self) -> float:
        if self.phase == "saving":
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def detail(self) -> str:
        if self.phase == "training":
            eta = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
            return f"building the offline demo model: training step {self.step} of {self.total_steps}{eta}"
        return f"building the offline demo model: {self.phase}"

    def as_json(self) -> dict:
        return {
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "fraction": round(self.fraction, 4),
            "elapsed_s": round(self.elapsed_s, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }


class DemoBuild:
    """Runs the build child; `progress()` may be called from any thread while `run()` blocks."""

    def __init__(self, output: Path | None = None) -> None:
        self.output = output or demo_model_dir()
        self._dir = tempfile.TemporaryDirectory(prefix="textgen-demo-build-")
        self.progress_file = Path(self._dir.name) / "progress.json"
        self.started = time.monotonic()
        self._process: subprocess.Popen | None = None
        self._stopped = threading.Event()

    def run(self) -> Path:
        """Blocking: build the model into `output`. Raises DemoBuildError."""
        command = [sys.executable, "-m", "app.finetune.demo", "--output", str(self.output)]
        command += ["--progress", str(self.progress_file)]
        log.info("building the offline demo model into %s (first run only)", self.output)
        try:
            # The child's progress bar and messages go to the server's terminal, as before.
            self._process = subprocess.Popen(command)
            if self._stopped.is_set():
                self._process.terminate()
            code = self._process.wait()
        finally:
            self._dir.cleanup()
        if self._stopped.is_set():
            raise DemoBuildError("the demo model build was stopped (the server is shutting down)")
        if code != 0:
            raise DemoBuildError(f"building the demo model failed (exit {code}); its output is above")
        log.info("demo model built in %.0f s", time.monotonic() - self.started)
        return self.output

    def stop(self) -> None:
        self._stopped.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def progress(self) -> BuildProgress:
        elapsed = time.monotonic() - self.started
        try:
            body = json.loads(self.progress_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return BuildProgress("starting", 0, 0, elapsed, None)
        step, total = int(body["step"]), int(body["total_steps"])
        eta = None
        if body["phase"] == "training" and step >= 5:
            eta = body["training_s"] / step * (total - step)
        return BuildProgress(str(body["phase"]), step, total, elapsed, eta)
