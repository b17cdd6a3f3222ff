"""Service.load with the process and precision settings: TEXTGEN_TORCH_THREADS, TEXTGEN_QUANTIZE,
TEXTGEN_COMPILE."""

from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.load.loader import ModelLoadError
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


def test_compile_with_lora_adapters_is_refused_before_loading(tiny_gpt2_dir: Path) -> None:
    """A batch with adapter rows runs the eager step: base requests' bits would depend on their
    neighbours, so the combination is refused, naming both settings, before minutes of compiling."""
    service = Service(Settings(model=str(tiny_gpt2_dir), compile=True, allow_runtime_lora=True))
    try:
        with pytest.raises(ModelLoadError, match="TEXTGEN_COMPILE cannot be combined with LoRA adapters"):
            service.load()
        assert service.loaded is None, "refused before loading the model"
    finally:
        service.shutdown()
