from pathlib import Path

import pytest

from app.engine.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_lm(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(str(tiny_gpt2_dir))
