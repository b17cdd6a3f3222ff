"""Give back the resident pages of a memory-mapped checkpoint that no weight reads any more.

transformers memory-maps safetensors checkpoints: a loaded weight is a view of the file's mapping,
paged in when first read. Weights re-laid out after loading (GPT-2's `Conv1D` weights transposed for
the compact forward, layers converted or quantized) are new anonymous tensors, but the mapping stays
alive as long as any weight still lives in it (GPT-2's embeddings do), and the pages the copy read
stay resident and count in the process's RSS: ~325 MiB of GPT-2-124M's 475 MiB in fp32, measured with
`python -m bench.rss` (README, "Memory").

`page_out_stale` drops those pages from this process (madvise MADV_DONTNEED) without changing
what any memory holds: it advises only pages that /proc/self/pagemap shows hold nothing but the
file's contents (never one written since it was mapped, a private copy), so a page touched again
would be read back from the file unchanged; where pagemap is unreadable it uses MADV_PAGEOUT
(Linux 5.4+), which never discards a write but skips pages another process maps too. Only page
ranges wholly inside a stale weight and inside a file mapping are advised, so pages shared with a
live weight are left alone. Elsewhere (no /proc, no madvise) it does nothing.
"""

import ctypes
import logging
import struct
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4  # linux/mman.h
_MADV_PAGEOUT = 21
_PAGE = 4096


def storage_ranges(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{start address: bytes} of the CPU storages behind `tensors` (views share one entry)."""
    ranges: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "cpu" or t.is_meta:
            continue
        try:
            storage = t.untyped_storage()
            start, size = storage.data_ptr(), storage.nbytes()
        except (NotImplementedError, RuntimeError):  # tensor subclasses (torchao's int8) have no plain storage
            continue
        if size:
            ranges[start] = size
    return ranges


def module_storages(module: torch.nn.Module) -> dict[int, int]:
    """`storage_ranges` of every parameter and buffer of `module`."""
    return storage_ranges([*module.parameters(), *module.buffers()])


def file_mappings(maps: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """[(start, end)] address ranges of this process mapped from regular files; [] without /proc."""
    try:
        with open(maps) as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # address perms offset dev inode [path]: inode 0 is anonymous memory (heap, stacks, [vdso])
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            out.append((start, end))
    return out


def _unwritten_runs(first: int, last: int) -> list[tuple[int, int]] | None:
    """Runs of pages in [first, last) that hold nothing but the file's contents (not present, or a
    page-cache page), from /proc/self/pagemap; None where it cannot be read. A private mapping's
    page written since it was mapped is an anonymous copy (present without bit 61, or swapped):
    dropping it would lose the write, so runs stop at it."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first // _PAGE * 8)
            entries = f.read((last - first) // _PAGE * 8)
    except OSError:
        return None
    runs: list[tuple[int, int]] = []
    run_start: int | None = None
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
        address = first + i * _PAGE
        written = (entry >> 63 & 1 and not entry >> 61 & 1) or entry >> 62 & 1  # present anonymous, or swapped
        if written and run_start is not None:
            runs.append((run_start, address))
            run_start = None
        elif not written and run_start is None:
            run_start = address
    if run_start is not None:
        runs.append((run_start, first + len(entries) // 8 * _PAGE))
    return runs


def page_out_stale(before: dict[int, int], after: dict[int, int]) -> int:
    """Drop the file-backed pages of storages in `before` that are not in `after` (both from
    `storage_ranges`) from this process. Returns the bytes advised (0 when none, or where madvise
    is unavailable)."""
    stale = [(start, start + size) for start, size in before.items() if start not in after]
    if not stale:
        return 0
    mappings = file_mappings()
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in stale:
        first = -(-start // _PAGE) * _PAGE  # whole pages only: the edges may hold a live neighbour
        last = end // _PAGE * _PAGE
        if last <= first or not any(lo <= first and last <= hi for lo, hi in mappings):
            continue
        runs = _unwritten_runs(first, last)
        # MADV_DONTNEED unmaps the pages whoever else maps the file (MADV_PAGEOUT skips pages another
        # process maps: two servers of one checkpoint); without pagemap to prove them unwritten,
        # MADV_PAGEOUT, which never discards a write.
        advice = [(first, last, _MADV_PAGEOUT)] if runs is None else [(a, b, _MADV_DONTNEED) for a, b in runs]
        for lo, hi, how in advice:
            if madvise(lo, hi - lo, how) != 0:
                log.debug("madvise(%d) failed: errno %d", how, ctypes.get_errno())
                return advised
            advised += hi - lo
    return advised
