"""A textgen fleet on one machine: N `textgen serve` replicas on 127.0.0.1 behind HAProxy
(health check GET /ready every 500 ms, least connections), each writing OpenTelemetry traces
as OTLP JSON lines (TEXTGEN_OTLP_ENDPOINT=file://...), or to a collector with --otlp-endpoint.

    python deploy/local/fleet.py [--replicas 2] [--port 8080] [--model DIR] [--dir .fleet]
    make fleet

Ctrl-C (or SIGTERM) stops HAProxy and drains every replica. `Fleet` is also what the
rolling-restart test drives (tests/e2e/test_fleet.py). Needs `haproxy` on PATH (Debian:
apt-get install haproxy).
"""

import argparse
import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIND = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((BIND, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class Replica:
    def __init__(self, name: str, port: int, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.port, self.command, self.env, self.log_path = name, port, command, env, log_path
        self.process: subprocess.Popen | None = None
        self.terminated = False

    @property
    def url(self) -> str:
        return f"http://{BIND}:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("a")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.terminated = False
        log.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if _get(f"{self.url}/ready")[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def terminate(self) -> None:
        """SIGTERM once (a second one would make the replica exit without draining)."""
        p = self.process
        if p is not None and p.poll() is None and not self.terminated:
            p.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (lame duck, then drain) and wait for the exit; SIGKILL past `timeout`."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            self.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        return p.returncode


class Fleet:
    """Replicas plus HAProxy. `url` is the balancer's frontend; `stats()` reads HAProxy's view."""

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 2,
        model: str | None = None,
        port: int | None = None,
        drain_delay: float = 2.0,
        otlp_endpoint: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
        self.haproxy_bin = haproxy
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.stats_port = free_port()
        self.drain_delay = drain_delay
        self.trace_dir = workdir / "traces"
        self.trace_dir.mkdir(exist_ok=True)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
        base_env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        base_env.update({k: v for k, v in os.environ.items() if k.startswith("TEXTGEN_")})
        base_env.update(env or {})
        self.replicas: list[Replica] = []
        for i in range(replicas):
            name = f"r{i}"
            rport = free_port()
            renv = dict(base_env)
            renv.update(
                TEXTGEN_HOST=BIND,
                TEXTGEN_PORT=str(rport),
                TEXTGEN_DRAIN_DELAY=str(drain_delay),
                TEXTGEN_OTLP_ENDPOINT=otlp_endpoint or f"file://{self.trace_dir / f'spans-{name}.jsonl'}",
                OTEL_SERVICE_NAME="textgen",
                OTEL_RESOURCE_ATTRIBUTES=f"service.instance.id={name}",
                OTEL_BSP_SCHEDULE_DELAY="500",
            )
            if model is not None:
                renv["TEXTGEN_MODEL"] = model
            command = [sys.executable, "-m", "app.cli", "serve", "--log-level", "warning"]
            self.replicas.append(Replica(name, rport, command, renv, workdir / f"{name}.log"))
        self.config_path = workdir / "haproxy.cfg"
        self.haproxy: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{BIND}:{self.port}"

    def span_files(self) -> list[Path]:
        return sorted(self.trace_dir.glob("spans-*.jsonl"))

    def write_config(self) -> None:
        servers = "\n".join(f"    server {r.name} {BIND}:{r.port} check" for r in self.replicas)
        text = (HERE / "haproxy.cfg.in").read_text()
        for key, value in {
            "@BIND@": BIND,
            "@PORT@": str(self.port),
            "@STATS_PORT@": str(self.stats_port),
            "@DRAIN_DELAY@": f"{self.drain_delay:g} s",
            "@SERVERS@": servers,
        }.items():
            text = text.replace(key, value)
        self.config_path.write_text(text)
        subprocess.run([self.haproxy_bin, "-c", "-q", "-f", str(self.config_path)], check=True)

    def start(self, timeout: float = 180.0) -> None:
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready(timeout)
        self.write_config()
        log = (self.workdir / "haproxy.log").open("a")
        self.haproxy = subprocess.Popen(
            [self.haproxy_bin, "-f", str(self.config_path), "-db"], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.wait_up([r.name for r in self.replicas], timeout=30)

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's CSV stats for the backend's servers, by server name (status UP/DOWN, ...)."""
        code, text = _get(f"http://{BIND}:{self.stats_port}/stats;csv")
        if code != 200:
            raise RuntimeError(f"HAProxy stats answered {code}")
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas" and row["svname"].startswith("r")}

    def wait_up(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                stats = self.stats()
                if all(stats.get(n, {}).get("status", "").startswith("UP") for n in names):
                    return
            if self.haproxy is not None and self.haproxy.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{(self.workdir / 'haproxy.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy does not see {names} UP after {timeout} s")
            time.sleep(0.1)

    def restart(self, replica: Replica, timeout: float = 120.0) -> tuple[int | None, float, float]:
        """SIGTERM one replica, wait for its drained exit, start it again and wait until HAProxy
        routes to it. Returns the old process's exit code, seconds to exit, seconds to be back."""
        t = time.monotonic()
        code = replica.stop(timeout)
        stopped = time.monotonic()
        replica.start()
        replica.wait_ready(timeout)
        self.wait_up([replica.name], timeout=30)
        return code, stopped - t, time.monotonic() - stopped

    def stop(self) -> list[int | None]:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
        for r in self.replicas:  # all drain at once
            r.terminate()
        return [r.stop() for r in self.replicas]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8080, help="HAProxy's port on 127.0.0.1")
    parser.add_argument("--model", default=None, help="TEXTGEN_MODEL for every replica (default: the demo model)")
    parser.add_argument("--dir", type=Path, default=ROOT / ".fleet", help="logs, haproxy.cfg and traces")
    parser.add_argument("--drain-delay", type=float, default=2.0, help="TEXTGEN_DRAIN_DELAY (>= 2 check intervals)")
    parser.add_argument("--otlp-endpoint", default=None, help="a collector instead of the trace files")
    args = parser.parse_args(argv)
    fleet = Fleet(
        args.dir,
        replicas=args.replicas,
        model=args.model,
        port=args.port,
        drain_delay=args.drain_delay,
        otlp_endpoint=args.otlp_endpoint,
    )
    stopping = False

    def on_signal(sig: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fleet.start()
        print(f"textgen fleet: {fleet.url} (HAProxy, leastconn, GET /ready every 500 ms)")
        for r in fleet.replicas:
            print(f"  {r.name}: {r.url}  log {r.log_path}")
        print(f"  HAProxy stats: http://{BIND}:{fleet.stats_port}/stats")
        print(f"  traces: {args.otlp_endpoint or fleet.trace_dir}")
        print("Ctrl-C stops the fleet (each replica drains first).")
        while not stopping:
            time.sleep(0.5)
    finally:
        print("stopping: HAProxy, then each replica drains", file=sys.stderr)
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
