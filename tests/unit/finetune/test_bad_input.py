"""Bad data or options: one clear message naming the file and line, exit 2, before any training."""

import json
from pathlib import Path

import pytest

from app.finetune.cli import main


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


CASES = {
    "missing field": (
        "data.jsonl",
        b'{"text": "fine"}\n{"body": "no text field"}\n',
        "data.jsonl:2: missing field 'text' (or 'prompt' and 'completion')",
    ),
    "prompt without completion": (
        "pairs.jsonl",
        b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "only a prompt"}\n',
        "pairs.jsonl:3: has 'prompt' but no 'completion' field",
    ),
    "non-JSON line": (
        "data.jsonl",
        b'{"text": "one"}\n{"text": "two"}\n{"text": "three"\n',
        "data.jsonl:3: not valid JSON",
    ),
    "not an object": ("data.jsonl", b'{"text": "one"}\n["a", "list"]\n', "data.jsonl:2: expected a JSON object"),
    "wrong type": ("data.jsonl", b'{"text": 42}\n', "data.jsonl:1: field 'text' must be a string, got int"),
    "empty file": ("notes.txt", b"", "notes.txt: file is empty"),
    "blank file": ("notes.txt", b"  \n\n", "notes.txt: file is empty"),
    "wrong encoding": (
        "notes.txt",
        "line one\nline two\ncaf\u00e9\n".encode("latin-1"),
        "notes.txt:3: not valid UTF-8",
    ),
    "wrong encoding in jsonl": (
        "data.jsonl",
        b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"),
        "data.jsonl:2: not valid UTF-8",
    ),
    "unsupported type": ("data.csv", b"text\nhello\n", "data.csv: unsupported file type '.csv'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_clear_error(
    case: str, tmp_path: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, content, message = CASES[case]
    data = _write(tmp_path / name, content)
    output = tmp_path / "out"
    assert main(["--model", str(tiny_gpt2_dir), "--data", str(data), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert str(tmp_path) in err, "the message names the file by its path"
    assert "Traceback" not in err
    assert not output.exists(), "nothing may be written before the input is known to be good"


def test_missing_file_and_empty_folder(tmp_path: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", str(tiny_gpt2_dir), "--output", str(tmp_path / "out")]
    assert main([*base, "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert main([*base, "--data", str(tmp_path / "empty")]) == 2
    assert "a.txt: file is empty" in capsys.readouterr().err


def test_bad_eval_file_is_caught_before_training(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(tmp_path / "eval.jsonl", b'{"text": "ok"}\nnot json\n')
    argv = ["--model", str(tiny_gpt2_dir), "--data", str(corpus_txt), "--output", str(tmp_path / "o")]
    assert main([*argv, "--eval-file", str(bad)]) == 2
    assert "eval.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_too_little_data_for_an_eval_split(
    tmp_path: Path, tiny_gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "short.txt", b"just a few words")
    argv = ["--model", str(tiny_gpt2_dir), "--data", str(data), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "too little data for an eval split" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora", "--from-scratch", "tiny"], "cannot be combined with --from-scratch"),
        (["--no-merge"], "--no-merge only applies with --lora"),
        (["--epochs", "many"], "--epochs: Input should be a valid number"),
        (["--eval-split", "1.5"], "--eval-split: Input should be less than 1"),
        (["--eval-split", "0", "--early-stopping-patience", "2"], "needs evaluation data"),
        (["--block-size", "4096"], "exceeds the model's context of 256"),
    ],
)
def test_bad_options_are_one_clear_error(
    argv: list[str],
    message: str,
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    corpus_txt: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--model", str(tiny_gpt2_dir), "--data", str(corpus_txt), "--output", str(tmp_path / "o")]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_output_in_use_needs_resume(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_txt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "o"
    output.mkdir()
    (output / "config.json").write_text(json.dumps({}))
    assert main(["--model", str(tiny_gpt2_dir), "--data", str(corpus_txt), "--output", str(output)]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err
