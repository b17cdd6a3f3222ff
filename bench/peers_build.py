"""Build the benchmark's CPU peers once: llama.cpp's `llama-server` and the model in GGUF and
CTranslate2 formats. `python -m bench.peers_build` (`make bench-peers`); `--help` for options.

Everything lands under `${XDG_CACHE_HOME:-~/.cache}/textgen/peers` and is reused:
- `src/llama_cpp_python-<ver>/vendor/llama.cpp/build/bin/llama-server` (with its lib*.so beside
  it), built from the llama.cpp sources vendored in PyPI's `llama-cpp-python` sdist: PyPI is the
  one package source this project already trusts, and that sdist pins a llama.cpp commit.
- `models/<bench model dir name>/model-f32.gguf` and `models/<...>/ct2-f32/`, re-converted when
  the bench model's weights change (size and mtime of model.safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # vendors llama.cpp commit 0c1e570
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else it downloads the web UI, which fails offline
    "-DLLAMA_OPENSSL=OFF",
]
BUILD_JOBS = 2


def cache_root(env: dict[str, str] | None = None) -> Path:
    """`${XDG_CACHE_HOME:-~/.cache}/textgen/peers`."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".cache")
    return Path(base) / "textgen" / "peers"


@dataclass(frozen=True)
class PeerPaths:
    """Where the built peers live for one bench model."""

    root: Path
    model_dir: Path

    @property
    def sdist(self) -> Path:
        return self.root / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"

    @property
    def llama_src(self) -> Path:
        return self.root / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"

    @property
    def llama_server(self) -> Path:
        return self.llama_src / "build" / "bin" / "llama-server"

    @property
    def converted(self) -> Path:
        return self.root / "models" / self.model_dir.name

    @property
    def gguf(self) -> Path:
        return self.converted / "model-f32.gguf"

    @property
    def ct2(self) -> Path:
        return self.converted / "ct2-f32"


def model_stamp(model_dir: Path) -> str:
    """Identifies the bench model's weights: size and mtime of each safetensors file."""
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(model_dir.glob("*.safetensors"))]
    return ";".join(parts)


def _fresh(target: Path, stamp: str) -> bool:
    marker = target.with_name(target.name + ".stamp")
    return target.exists() and marker.exists() and marker.read_text() == stamp


def _mark(target: Path, stamp: str) -> None:
    target.with_name(target.name + ".stamp").write_text(stamp)


def cmake_configure_cmd(src: Path) -> list[str]:
    return ["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_FLAGS]


def cmake_build_cmd(src: Path, jobs: int = BUILD_JOBS) -> list[str]:
    return ["cmake", "--build", str(src / "build"), "--target", "llama-server", f"-j{jobs}"]


def missing_tools() -> list[str]:
    """Build tools not on PATH, with what to install."""
    hints = {"cmake": "apt-get install -y cmake", "c++": "apt-get install -y g++", "make": "apt-get install -y make"}
    return [f"{tool} (install: {hint})" for tool, hint in hints.items() if shutil.which(tool) is None]


def _run(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with log.open("ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def build_llama_server(paths: PeerPaths, jobs: int = BUILD_JOBS) -> Path:
    """Download the sdist (once), unpack it, build `llama-server` CPU-only; returns the binary."""
    if paths.llama_server.exists():
        print(f"llama-server: cached at {paths.llama_server}", file=sys.stderr)
        return paths.llama_server
    missing = missing_tools()
    if missing:
        raise SystemExit("cannot build llama-server, missing: " + ", ".join(missing) + " (apt-get update first)")
    paths.sdist.parent.mkdir(parents=True, exist_ok=True)
    if not paths.sdist.exists():
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                "-d",
                str(paths.sdist.parent),
            ]
        )
    if not (paths.llama_src / "CMakeLists.txt").exists():
        with tarfile.open(paths.sdist) as tar:
            tar.extractall(paths.sdist.parent, filter="data")
    log = paths.root / "llama-build.log"
    print(f"llama-server: building (about 10 minutes on 2 cores; log {log})", file=sys.stderr, flush=True)
    _run(cmake_configure_cmd(paths.llama_src), log)
    _run(cmake_build_cmd(paths.llama_src, jobs), log)
    if not paths.llama_server.exists():
        raise SystemExit(f"build finished but {paths.llama_server} is missing; see {log}")
    return paths.llama_server


def gguf_config(config: dict[str, object]) -> dict[str, object]:
    """transformers 5 no longer writes GPT-2's `n_ctx`; the converter needs it (= n_positions)."""
    out = dict(config)
    if "n_ctx" not in out and "n_positions" in out:
        out["n_ctx"] = out["n_positions"]
    return out


def convert_gguf(paths: PeerPaths) -> Path:
    """The bench model as an f32 GGUF, via the vendored convert_hf_to_gguf.py and gguf-py."""
    stamp = model_stamp(paths.model_dir)
    if _fresh(paths.gguf, stamp):
        return paths.gguf
    converter = paths.llama_src / "convert_hf_to_gguf.py"
    if not converter.exists():
        raise SystemExit(f"{converter} is missing: build llama-server first")
    staging = paths.converted / "hf-with-n_ctx"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for item in paths.model_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            os.symlink(item.resolve(), staging / item.name)
    config = json.loads((paths.model_dir / "config.json").read_text())
    (staging / "config.json").write_text(json.dumps(gguf_config(config), indent=1))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(paths.llama_src / "gguf-py"), env.get("PYTHONPATH")] if p)
    tmp = paths.gguf.with_name(paths.gguf.name + ".tmp")
    _run([sys.executable, str(converter), str(staging), "--outtype", "f32", "--outfile", str(tmp)], env=env)
    tmp.replace(paths.gguf)
    shutil.rmtree(staging)
    _mark(paths.gguf, stamp)
    return paths.gguf


def convert_ct2(paths: PeerPaths) -> Path:
    """The bench model as a CTranslate2 f32 model directory, via `ct2-transformers-converter`."""
    stamp = model_stamp(paths.model_dir)
    if _fresh(paths.ct2, stamp):
        return paths.ct2
    exe = Path(sys.executable).parent / "ct2-transformers-converter"
    if not exe.exists():
        raise SystemExit("ctranslate2 is not installed: pip install -e '.[bench]'")
    paths.converted.mkdir(parents=True, exist_ok=True)
    _run(
        [
            str(exe),
            "--model",
            str(paths.model_dir),
            "--output_dir",
            str(paths.ct2),
            "--quantization",
            "float32",
            "--force",
        ]
    )
    _mark(paths.ct2, stamp)
    return paths.ct2


def main(argv: list[str] | None = None) -> int:
    from bench.model import default_model_dir, ensure_model

    p = argparse.ArgumentParser(prog="python -m bench.peers_build", description=__doc__)
    p.add_argument("--model-dir", type=Path, help="the bench model (default: bench.run's, built on first use)")
    p.add_argument("--seed", type=int, default=0, help="bench model seed (default %(default)s)")
    p.add_argument("--jobs", type=int, default=BUILD_JOBS, help="parallel compile jobs (default %(default)s)")
    p.add_argument("--skip-llama", action="store_true", help="do not build llama-server or convert to GGUF")
    p.add_argument("--skip-ct2", action="store_true", help="do not convert to CTranslate2")
    args = p.parse_args(argv)
    model_dir = args.model_dir or default_model_dir(args.seed)
    ensure_model(model_dir, seed=args.seed)
    paths = PeerPaths(cache_root(), model_dir)
    if not args.skip_llama:
        print(f"llama-server: {build_llama_server(paths, args.jobs)}")
        print(f"gguf: {convert_gguf(paths)}")
    if not args.skip_ct2:
        print(f"ctranslate2: {convert_ct2(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
