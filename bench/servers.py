"""Server subprocesses: start, wait for health, sample memory, stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_script(name: str) -> str | None:
    """A console script next to this interpreter (the project's venv), else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it if the benchmark dies without cleaning up."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerError(RuntimeError):
    pass


class Server:
    """A server subprocess in its own process group, with its output in `log_path`."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def wait_healthy(self, timeout_s: float, path: str = "/health") -> float:
        """Poll GET `path` until it answers 200; returns seconds waited. Bounded by `timeout_s`."""
        assert self.proc is not None
        start = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() - start < timeout_s:
                if self.proc.poll() is not None:
                    raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    if client.get(self.base_url + path).status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise ServerError(f"{self.name} not healthy after {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after `grace_s`."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None


class RssSampler:
    """Peak resident memory of a process and its children, sampled on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def current(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.current())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak_bytes = max(self.peak_bytes, self.current())


def textgen_env(repo: Path, model_name: str, **settings: str) -> dict[str, str]:
    """The environment of a benchmarked `textgen serve` (CPU, fp32, offline, no playground, no
    drain pause), plus the phase's own TEXTGEN_* `settings`."""
    return {
        **os.environ,
        "PYTHONPATH": str(repo),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TEXTGEN_DEVICE": "cpu",
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_DRAIN_DELAY": "0",
        "TEXTGEN_UI": "false",
        "TEXTGEN_SERVED_MODEL_NAME": model_name,
        **settings,
    }
