"""Options: every field is a flag and a YAML key; flags win over the file; errors are clear."""

from pathlib import Path

import pytest

from app.finetune.cli import build_parser, main, parse_config
from app.finetune.config import FinetuneConfig, flag

CONTRACT_FLAGS = [
    "--model", "--data", "--output", "--epochs", "--max-steps", "--block-size", "--learning-rate",
    "--batch-size", "--eval-split", "--lora", "--resume", "--from-scratch", "--seed", "--eval-file",
    "--no-merge", "--lora-rank", "--lora-alpha", "--lora-dropout", "--grad-accum",
    "--gradient-checkpointing", "--early-stopping-patience", "--save-steps", "--config",
]  # fmt: skip


def test_help_lists_every_option() -> None:
    text = build_parser().format_help()
    for name in CONTRACT_FLAGS + [flag(f) for f in FinetuneConfig.model_fields]:
        assert name in text, name


def test_yaml_sets_options_and_flags_override_it(tmp_path: Path) -> None:
    config_file = tmp_path / "ft.yaml"
    config_file.write_text(
        "model: base-dir\ndata: notes.txt\noutput: out\nblock-size: 128\nlora: true\nlora_rank: 4\n"
        "lora-targets: [q_proj, v_proj]\nepochs: 2\n"
    )
    config = parse_config(["--config", str(config_file), "--epochs", "5", "--lora-rank", "16"])
    assert config.model == "base-dir"
    assert config.output == Path("out")
    assert config.block_size == 128
    assert config.lora is True
    assert config.lora_targets == ["q_proj", "v_proj"]
    assert config.epochs == 5.0
    assert config.lora_rank == 16


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("model: m\ndata: d\noutput: o\nepocs: 3\n", "unknown option(s): epocs"),
        ("model: m\ndata: d\noutput: o\nbatch_size: lots\n", "--batch-size: Input should be a valid integer"),
        ("model: m\noutput: o\n", "--data: Field required"),
        ("- just\n- a list\n", "expected a mapping of option names to values"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_clear_error(
    yaml_text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "ft.yaml"
    config_file.write_text(yaml_text)
    assert main(["--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: cannot read config file" in capsys.readouterr().err


def test_docs_table_lists_every_option() -> None:
    docs = (Path(__file__).resolve().parents[3] / "docs" / "finetune.md").read_text(encoding="utf-8")
    for name in FinetuneConfig.model_fields:
        assert f"| `{flag(name)}`" in docs, f"docs/finetune.md lacks {flag(name)}"


def test_docs_yaml_example_is_valid(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[3] / "docs" / "finetune.md").read_text(encoding="utf-8")
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "ft.yaml").write_text(example)
    config = parse_config(["--config", str(tmp_path / "ft.yaml")])
    assert config.lora and config.learning_rate == 2e-3 and config.block_size == 256
