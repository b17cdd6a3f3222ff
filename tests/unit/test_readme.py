"""The README documents every setting and every metric the app exports."""

from pathlib import Path

from app.config import Settings
from app.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`TEXTGEN_{name.upper()}`" in README, name


def test_every_metric_is_documented() -> None:
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in README, name
