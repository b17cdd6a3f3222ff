"""Read every supported input into Examples, rejecting bad input with the file and line at fault."""

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.finetune.examples import Example

TEXT_SUFFIXES = (".txt", ".jsonl")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json")


class DataError(Exception):
    """Unusable input data; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class LoadedData:
    examples: list[Example]
    sha256: str


def examples_sha256(examples: Iterable[Example]) -> str:
    """Identifies the training data whatever its source format: a hash of what was actually read."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt, ex.completion], ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def load_data(source: str, *, split: str = "train") -> LoadedData:
    examples = list(_read(source, split))
    if not examples:
        raise DataError(f"{source}: no text in it")
    return LoadedData(examples, examples_sha256(examples))


def _read(source: str, split: str) -> Iterator[Example]:
    path = Path(source)
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if files:
            for file in files:
                yield from _read_file(file)
        else:
            yield from _read_dataset_dir(path, split)
    elif path.suffix or path.is_absolute() or source.startswith("."):
        raise DataError(f"{source}: no such file or folder")
    else:
        yield from _read_hub_dataset(source, split)


def _read_file(path: Path) -> Iterator[Example]:
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .txt or .jsonl)")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".txt":
        yield Example(_decode(raw, path))
    else:
        yield from _read_jsonl(raw, path)


def _decode(raw: bytes, path: Path, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        where = line if line is not None else raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8"
        ) from None


def _read_jsonl(raw: bytes, path: Path) -> Iterator[Example]:
    found = False
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        text = _decode(line, path, number)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        example = to_example(record, f"{path}:{number}")
        if example is not None:
            found = True
            yield example
    if not found:
        raise DataError(f"{path}: no non-empty 'text' or 'completion' in any line")


def to_example(record: Any, where: str) -> Example | None:
    """None for an empty text, which carries nothing to learn (datasets such as wikitext have many)."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: has '{_other(key)}' but no '{key}' field")
        prompt, completion = _string(record, "prompt", where), _string(record, "completion", where)
        return Example(completion=completion, prompt=prompt) if completion else None
    if "text" not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: missing field 'text' (or 'prompt' and 'completion'); fields present: {keys}")
    text = _string(record, "text", where)
    return Example(text) if text else None


def _other(key: str) -> str:
    return "completion" if key == "prompt" else "prompt"


def _string(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _read_dataset_dir(path: Path, split: str) -> Iterator[Example]:
    import datasets

    try:
        if any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
            loaded = datasets.load_from_disk(str(path))
            rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            rows = datasets.load_dataset(str(path), split=split)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path}: no .txt/.jsonl files and not a readable dataset ({exc})") from None
    yield from _dataset_examples(rows, str(path))


def _read_hub_dataset(name: str, split: str) -> Iterator[Example]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types (network, missing config, no such repo)
        raise DataError(f"{name}: not a file or folder, and not a loadable `datasets` name ({exc})") from None
    yield from _dataset_examples(rows, name)


def _dataset_examples(rows: Sequence[Mapping[str, Any]], source: str) -> Iterator[Example]:
    columns = set(getattr(rows, "column_names", None) or [])
    if columns and "text" not in columns and not {"prompt", "completion"} <= columns:
        raise DataError(
            f"{source}: no 'text' column (or 'prompt' and 'completion'); columns: {', '.join(sorted(columns))}"
        )
    for index, row in enumerate(rows):
        example = to_example(row, f"{source} row {index}")
        if example is not None:
            yield example
