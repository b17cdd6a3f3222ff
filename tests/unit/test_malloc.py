"""The serving process takes large blocks from mmap (app/malloc.py), in a fresh interpreter each."""

import os
import subprocess
import sys

import pytest

from app.malloc import ENV, MMAP_THRESHOLD_BYTES, fix_mmap_threshold

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt/mallinfo2")

# After a 20 MiB block is freed, glibc's dynamic threshold rises to 20 MiB: a 10 MiB block then comes
# from the heap, unless the threshold is fixed (at 8 MiB). mallinfo2().hblkhd is the bytes held in mmapped blocks.
_PROBE = """
import ctypes, sys
from app.malloc import fix_mmap_threshold
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fix":
    print("set", fix_mmap_threshold())
libc.free(libc.malloc(20 << 20))
block = libc.malloc(10 << 20)
print("mmapped", libc.mallinfo2().hblkhd >= 10 << 20)
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ENV} | (env or {})
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=environ, timeout=60, check=True
    )
    return done.stdout


def test_large_blocks_come_from_mmap_once_the_threshold_is_fixed() -> None:
    assert "mmapped False" in _probe("default")  # glibc's dynamic threshold: what the fix is for
    out = _probe("fix")
    assert f"set {MMAP_THRESHOLD_BYTES}" in out
    assert "mmapped True" in out


@pytest.mark.parametrize("name", ENV)
def test_a_threshold_from_the_environment_is_left_alone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "65536")
    assert fix_mmap_threshold() is None
    assert "set None" in _probe("fix", {name: str(64 << 20)})
