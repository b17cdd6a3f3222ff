import dataclasses
from pathlib import Path

import pytest

from app.engine.load.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_lm(tiny_gpt2_dir: Path) -> LoadedModel:
    return load_model(str(tiny_gpt2_dir))


@pytest.fixture(params=["compact", "transformers"])
def served_lm(request: pytest.FixtureRequest, tiny_lm: LoadedModel) -> LoadedModel:
    """The tiny GPT-2 served by each runner: `CompactRunner` (its compact forward) and
    `TransformersRunner` (the same weights through transformers, as every other model is served)."""
    return tiny_lm if request.param == "compact" else dataclasses.replace(tiny_lm, compact=None)
