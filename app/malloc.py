"""glibc malloc tuning for the serving process: blocks of 8 MiB and more always come from mmap.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own mapping, given
back to the system on free; below it, from its heaps, where freed memory is kept for reuse. The
threshold is dynamic: freeing a mapped block raises it to that block's size, up to 32 MiB. A
server's large, short-lived tensors (KV buffers of a growing batch, reallocated one layer at a time,
prefill activations and caches) then land in the heaps, change size from step to step, fragment
them and stay resident.

`fix_mmap_threshold` sets fixed thresholds, as glibc's MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ environment variables would (either set there wins, and nothing is changed):
- mmap at 8 MiB: lower is lower still at the peak (docs/performance.md, "Memory": 1 MiB ~100 MiB below the
  dynamic threshold under 32 clients, 8 MiB ~50), but every block above it is a fresh mapping whose
  pages fault in on first touch: at 1 MiB each batch-32 decode step mapped ~18 MiB afresh (+4,700
  page faults a step), at 8 MiB a decode step adds none (`bench.step`, 4 against 28 steps);
- trim at 32 MiB: with the mmap threshold fixed, glibc would otherwise give the top of the heap
  back above 128 KiB and fault it in again on the next step (+30% page faults at batch 1 with a
  1 MiB mmap threshold and no trim setting, measured).
Only where a block comes from changes, never what memory holds. Elsewhere (musl, macOS, an
LD_PRELOADed allocator with its own policy) it does nothing.
"""

import ctypes
import os

MMAP_THRESHOLD_BYTES = 8 << 20
TRIM_THRESHOLD_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES, trim: int = TRIM_THRESHOLD_BYTES) -> int | None:
    """Make glibc serve blocks of `threshold` bytes and more from mmap and keep up to `trim` bytes
    free at the top of its heap, unless either is set in the environment. Returns the mmap
    threshold if this call set it, else None."""
    if any(os.environ.get(name) for name in ENV):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the symbols the process has loaded: libc's
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1 or mallopt(_M_TRIM_THRESHOLD, trim) != 1:
        return None
    return threshold
