"""Stream the records of a dataset path, each with the file and line (or row) it came from.

A record is a dict (one JSON object, one table row). Readers are iterators: a corpus is never
held whole in memory, except a `.json` file, which is one JSON value (use `.jsonl` for large
data). Suffixes:

- `.jsonl`, `.jsonl.gz`: one JSON object per non-blank line ("line N"). Lines are split at
  "\\n" only: a JSON string may hold a raw U+2028, which `str.splitlines` would cut at.
- `.json`: a list of objects ("record N", counting from 1); a file of JSON Lines named `.json`
  is read as JSON Lines.
- `.parquet`: the rows of the table ("row N"); needs pyarrow (extra `[parquet]`).
- `.txt`: the blocks of text between blank lines (whitespace-only lines count as blank), each the
  record `{"text": block}` ("line N", where the block starts). For the shipped Shakespeare corpus
  that is one record per speech: many documents of uneven length, which packing needs.
- a folder written by Hugging Face `datasets`' `save_to_disk` (it holds `state.json`): its Arrow
  files in `state.json` order ("row N" of each file), read with pyarrow directly, so the
  `datasets` package is not needed (pyarrow is one of its own dependencies). A `DatasetDict`
  folder (`dataset_dict.json`) gives its `train` split.
- any other folder: every file with one of the suffixes above below it, in sorted path order.
"""

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_cp.errors import UserError

KEY = "training.dataset_path"
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".txt")
_PARQUET_BATCH_ROWS = 1024
_BLANK = re.compile(r"[ \t\r\f\v]*\n?")


@dataclass(slots=True)
class Record:
    """One record and where it is: `where` names the file and line, row or record number."""

    data: dict[str, Any]
    file: Path
    unit: str  # "line", "row" or "record"
    number: int  # counted from 1

    @property
    def where(self) -> str:
        return f"{self.file} {self.unit} {self.number}"


def suffix_of(file: Path) -> str | None:
    """The dataset suffix of a file name, or None."""
    return next((s for s in SUFFIXES if file.name.endswith(s)), None)


def dataset_files(path: str | Path) -> list[Path]:
    """The files `iter_records(path)` reads, in order (for cache keys: their sizes and times)."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return dataset_files(_train_split(path))
        if (path / "state.json").is_file():
            return _arrow_files(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p))
        if not files:
            raise UserError(f"{KEY}: folder {path} has no {', '.join(SUFFIXES)} files (nor a save_to_disk dataset)")
        return files
    if path.is_file():
        if suffix_of(path) is None:
            raise UserError(f"{KEY}: {path} is not a {', '.join(SUFFIXES)} file (nor a folder of them)")
        return [path]
    raise UserError(f"{KEY}: {path} does not exist")


def iter_records(path: str | Path) -> Iterator[Record]:
    """Every record under `path`, in a fixed order; raises UserError naming the file and line."""
    for file in dataset_files(path):
        yield from iter_file(file)


def iter_file(file: Path) -> Iterator[Record]:
    suffix = suffix_of(file) or file.suffix
    if suffix in (".jsonl", ".jsonl.gz"):
        return _jsonl(file)
    if suffix == ".json":
        return _json(file)
    if suffix == ".parquet":
        return _parquet(file)
    if suffix == ".arrow":
        return _arrow(file)
    return _txt(file)


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8; binary reads split at b"\\n" only."""
    offset = 0
    try:
        with gzip.open(file, "rb") if file.name.endswith(".gz") else open(file, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{KEY}: {file} line {number} is not UTF-8 text"
                        f" (invalid byte 0x{raw[e.start]:02x} at byte offset {offset + e.start})"
                    ) from None
                offset += len(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{KEY}: {file} is not a readable gzip file ({e})") from None
    except OSError as e:
        raise UserError(f"{KEY}: {file} cannot be read ({e.strerror or e})") from None


def _jsonl(file: Path) -> Iterator[Record]:
    for number, line in _lines(file):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{KEY}: {file} line {number} is not JSON ({e.msg})") from None
        yield _checked(Record(data, file, "line", number))


def _json(file: Path) -> Iterator[Record]:
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"{"):
        yield from _jsonl(file)
        return
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{KEY}: {file} is not UTF-8 text (invalid byte at byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{KEY}: {file} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise UserError(f"{KEY}: {file} must hold a JSON list of records, got a {type(data).__name__}")
    for number, item in enumerate(data, start=1):
        yield _checked(Record(item, file, "record", number))


def _checked(record: Record) -> Record:
    if not isinstance(record.data, dict):
        raise UserError(f"{KEY}: {record.where} is not a JSON object (got {type(record.data).__name__})")
    return record


def _txt(file: Path) -> Iterator[Record]:
    block: list[str] = []
    start = 0
    for number, line in _lines(file):
        if _BLANK.fullmatch(line) is not None:
            if block:
                yield Record({"text": "".join(block).rstrip("\r\n")}, file, "line", start)
                block = []
            continue
        if not block:
            start = number
        # "\r\n" files give the same text as "\n" files
        block.append(line[:-2] + "\n" if line.endswith("\r\n") else line)
    if block:
        yield Record({"text": "".join(block).rstrip("\r\n")}, file, "line", start)


def _pyarrow(file: Path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(
            f"{KEY}: reading {file} needs pyarrow, which is not installed: pip install 'titan_cp[parquet]'"
        ) from None
    return pyarrow


def _parquet(file: Path) -> Iterator[Record]:
    pa = _pyarrow(file)
    try:
        table = pa.parquet.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{KEY}: {file} is not a Parquet file ({' '.join(str(e).split())})") from None
    yield from _rows(file, table.iter_batches(batch_size=_PARQUET_BATCH_ROWS))


def _arrow(file: Path) -> Iterator[Record]:
    pa = _pyarrow(file)
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{KEY}: {file} is not an Arrow stream file ({' '.join(str(e).split())})") from None
    yield from _rows(file, reader)


def _rows(file: Path, batches) -> Iterator[Record]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield Record(row, file, "row", number)


def _arrow_files(folder: Path) -> list[Path]:
    """The data files of a `save_to_disk` folder, in the order its state.json lists them."""
    state_file = folder / "state.json"
    try:
        names = [entry["filename"] for entry in json.loads(state_file.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{KEY}: {state_file} is not a datasets state.json (no _data_files: {e})") from None
    files = [folder / name for name in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{KEY}: {missing[0]} is listed in {state_file} but does not exist")
    return files


def _train_split(folder: Path) -> Path:
    dict_file = folder / "dataset_dict.json"
    try:
        splits = json.loads(dict_file.read_text())["splits"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{KEY}: {dict_file} is not a datasets dataset_dict.json ({e})") from None
    if "train" not in splits:
        raise UserError(
            f"{KEY}: {folder} is a DatasetDict without a 'train' split (splits: {', '.join(splits)});"
            " pass the split's folder"
        )
    return folder / "train"
