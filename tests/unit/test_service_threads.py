"""TEXTGEN_TORCH_THREADS sets torch's compute threads for the process before the model loads."""

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
