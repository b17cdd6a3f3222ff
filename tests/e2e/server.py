"""Start a real `textgen serve` process on 127.0.0.1 for end-to-end tests."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{log_path.read_text()[-3000:]}")


def start(
    model: Path | str | None,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    log_dir: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> Server:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    # No lame duck by default: tests that SIGTERM a server expect admission to stop at once.
    full_env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TEXTGEN_MAX_QUEUE": "256",
            "TEXTGEN_DRAIN_DELAY": "0",
        }
    )
    full_env.update(env or {})
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model is not None:
        command += ["--model", str(model)]
    command += args or []
    log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"textgen-{port}.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path, timeout)
    except BaseException:
        stop(process)
        raise
    return Server(url, process, log_path)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


@contextlib.contextmanager
def run_server(
    model: Path | str | None, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Iterator[str]:
    """Yield the base URL of a healthy server; stop it afterwards."""
    server = start(model, env, args)
    try:
        yield server.url
    finally:
        stop(server.process)
