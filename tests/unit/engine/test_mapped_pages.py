"""The checkpoint pages a re-laid-out weight was copied from leave the process's RSS; data stays."""

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine.load.loader import load_model
from app.engine.load.mapped_pages import file_mappings, module_storages, page_out_stale, storage_ranges
from app.engine.models import compact_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_PAGEOUT) and /proc are Linux's")

PAGE = 4096


def resident_pages(start: int, size: int) -> int:
    """Pages wholly inside [start, start + size) present in this process's page table (pagemap bit 63)."""
    first, last = -(-start // PAGE), (start + size) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first) * 8)
    return sum(1 for (e,) in struct.iter_unpack("<Q", entries) if e >> 63)


def private_copy(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of `model_dir` written to disk. Its own file: the kernel reclaims only pages no other
    mapping holds (a session fixture may map the original) and only clean ones (fsync)."""
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    fd = os.open(copy / "model.safetensors", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return copy


def in_file_mapping(start: int) -> bool:
    return any(lo <= start < hi for lo, hi in file_mappings())


def test_stale_checkpoint_pages_are_paged_out_and_read_back_unchanged(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(private_copy(tiny_gpt2_dir, tmp_path), dtype=torch.float32)
    # Views of every checkpoint weight, held so that the file's mapping outlives the re-layout.
    views = [p.detach() for p in model.parameters()]
    assert in_file_mapping(views[0].data_ptr()), "transformers no longer memory-maps safetensors"
    before = module_storages(model)
    # Re-lays out weights into new tensors: the LM head transposed for the invariant fp32 kernel
    # (app/engine/models/invariant_gemm.py), or the Conv1D weights transposed for oneDNN without it.
    compact = compact_model(model)
    assert compact is not None
    after = module_storages(model)
    stale = {p: n for p, n in before.items() if p not in after}
    original = next(v for v in views if v.untyped_storage().data_ptr() in stale and in_file_mapping(v.data_ptr()))
    values = original.clone()
    start, size = original.untyped_storage().data_ptr(), original.untyped_storage().nbytes()
    assert resident_pages(start, size) > 0  # the re-layout read them

    advised = page_out_stale(before, after)

    assert advised >= size - 2 * PAGE
    assert resident_pages(start, size) == 0
    assert torch.equal(original, values)  # read back from the file: the same weights
    live = storage_ranges(model.parameters())
    assert all(p not in stale for p in live)


def test_page_out_ignores_anonymous_memory() -> None:
    t = torch.arange(1 << 16, dtype=torch.float32)  # 256 KiB on the heap
    ranges = storage_ranges([t])
    assert page_out_stale(ranges, {}) == 0
    assert torch.equal(t, torch.arange(1 << 16, dtype=torch.float32))


def test_load_model_releases_what_the_compact_forward_copied(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(private_copy(tiny_gpt2_dir, tmp_path)), device="cpu", dtype="float32")
    assert loaded.compact is not None
    mapped = [(lo, hi) for lo, hi in file_mappings() if any(lo <= p < hi for p in module_storages(loaded.model))]
    assert mapped, "the embeddings should still be views of the checkpoint's mapping"
    live = sum(
        -(-n // PAGE) + 1 for p, n in module_storages(loaded.model).items() if any(lo <= p < hi for lo, hi in mapped)
    )
    resident = sum(resident_pages(lo, hi - lo) for lo, hi in mapped)
    # Without the page-out the transposed Conv1D weights' pages (~96 of them) stay resident too.
    assert resident <= live
