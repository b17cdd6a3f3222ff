"""Service.load with the process and precision settings: TEXTGEN_TORCH_THREADS, TEXTGEN_QUANTIZE."""

from pathlib import Path

import torch

from app.config import Settings
from app.service import Service


def test_torch_threads_setting_applies_to_the_engine(tiny_gpt2_dir: Path) -> None:
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    service = Service(Settings(model=str(tiny_gpt2_dir), torch_threads=wanted, embedding_model=None))
    try:
        service.load()
        assert torch.get_num_threads() == wanted
        assert service.ready
    finally:
        service.shutdown()
        torch.set_num_threads(before)


def test_a_quantized_model_passes_the_self_test_and_serves(tiny_gpt2_dir: Path) -> None:
    """int8 noise can cross a rounding step between batch shapes (0.11 here), beyond the fp32
    self-test margin; the self-test allows for it, as for half precision, and the model serves."""
    service = Service(Settings(model=str(tiny_gpt2_dir), quantize="int8-dynamic"))
    try:
        service.load()
        assert service.ready
        assert service.loaded is not None and "weights int8-dynamic" in service.loaded.forward_description
    finally:
        service.shutdown()
