"""Every input format reads into the same examples."""

from pathlib import Path

import datasets
import pytest

from app.finetune.data import DataError, load_data
from app.finetune.examples import Example

from .helpers import write_jsonl


def test_txt_file_and_folder(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.txt").write_text("second file\n")
    (tmp_path / "notes" / "a.txt").write_text("\ufefffirst file\n")  # a BOM is not part of the text
    (tmp_path / "notes" / "ignored.md").write_text("not read")
    loaded = load_data(str(tmp_path / "notes"))
    assert loaded.examples == [Example("first file\n"), Example("second file\n")]
    assert load_data(str(tmp_path / "notes" / "a.txt")).examples == [Example("first file\n")]


def test_jsonl_text_and_pairs(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"text": "plain", "id": 1}, {"prompt": "Q?", "completion": " A."}, {"text": ""}],
    )
    assert load_data(str(path)).examples == [Example("plain"), Example(" A.", prompt="Q?")]


def test_saved_dataset_dir_and_its_columns(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": ["one", "", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_data(str(tmp_path / "ds")).examples == [Example("one"), Example("two")]
    pairs = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["p"], "completion": ["c"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["x"], "completion": ["y"]}),
        }
    )
    pairs.save_to_disk(str(tmp_path / "pairs"))
    assert load_data(str(tmp_path / "pairs")).examples == [Example("c", prompt="p")]
    assert load_data(str(tmp_path / "pairs"), split="test").examples == [Example("y", prompt="x")]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="no 'text' column .*columns: body"):
        load_data(str(tmp_path / "bad"))


def test_unknown_dataset_name_is_a_data_error() -> None:
    with pytest.raises(DataError, match="not a file or folder, and not a loadable `datasets` name"):
        load_data("no-such-user/no-such-dataset-anywhere")


def test_the_data_hash_follows_the_content(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "same"}])
    (tmp_path / "b.txt").write_text("same")
    (tmp_path / "c.txt").write_text("different")
    assert load_data(str(a)).sha256 == load_data(str(tmp_path / "b.txt")).sha256
    assert load_data(str(a)).sha256 != load_data(str(tmp_path / "c.txt")).sha256
