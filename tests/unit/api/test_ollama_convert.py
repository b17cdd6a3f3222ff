"""Ollama field conversions that need no server: keep_alive durations and options refusals."""

import pytest

from app.api.errors import APIError
from app.api.ollama.convert import format_spec, keep_alive_seconds, sampling_fields
from app.api.ollama.protocol import Options


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("-1", -1.0), ("-1m", -60.0), ("2.5s", 2.5), ("90", 90.0)],
)
def test_keep_alive_durations(value: float | str, seconds: float) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", [0, "0", "0s", "5 minutes", "m", ""])
def test_keep_alive_unload_or_garbage_is_refused(value: float | str) -> None:
    with pytest.raises(APIError) as info:
        keep_alive_seconds(value)
    assert info.value.param == "keep_alive" and info.value.status == 422


def test_defaults_and_mapping() -> None:
    assert sampling_fields(None) == {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": None,
        "seed": None,
        "stop": None,
        "repetition_penalty": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    fields = sampling_fields(Options(top_k=0, seed=-1, stop="x", repeat_penalty=1.3, repeat_last_n=-1))
    assert fields["top_k"] == -1 and fields["seed"] is None and fields["stop"] == ["x"]
    assert fields["repetition_penalty"] == 1.3
    off = sampling_fields(Options(repeat_penalty=1.3, repeat_last_n=0))  # Ollama: 0 turns penalties off
    assert "repetition_penalty" not in off


@pytest.mark.parametrize(
    "options",
    [
        {"typical_p": 0.5},
        {"tfs_z": 0.9},
        {"mirostat": 1},
        {"mirostat_eta": 0.1},
        {"penalize_newline": True},
        {"num_keep": 4},
        {"num_thread": 8},
        {"use_mmap": True},
        {"repeat_last_n": 64},
        {"num_predict": 0},
        {"bogus": 1},
    ],
)
def test_refused_options_name_the_key(options: dict) -> None:
    with pytest.raises(APIError) as info:
        sampling_fields(Options(**options))
    assert info.value.param == f"options.{next(iter(options))}"


def test_off_values_are_accepted() -> None:
    sampling_fields(Options(typical_p=1.0, tfs_z=1.0, mirostat=0, penalize_newline=False))


def test_format() -> None:
    assert format_spec("") is None and format_spec(None) is None
    assert format_spec("json") == {"type": "json_object"}
    assert format_spec({"type": "object"})["json_schema"]["schema"] == {"type": "object"}  # type: ignore[index]
    with pytest.raises(APIError):
        format_spec("yaml")
