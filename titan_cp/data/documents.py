"""Read a dataset path into a list of document texts.

Rules (docs/data.md):
- `.jsonl`: one document per non-blank line, taken from its `text` string field.
- `.txt`: documents are the blocks of text between blank lines (whitespace-only lines count as
  blank). For the shipped Shakespeare corpus that is one document per speech: many documents of
  uneven length, which is what packing needs; a whole-file-is-one-document rule would give one
  380K-token document and nothing to pack. Use `.jsonl` to keep paragraphs together.
- a folder: every `.txt` and `.jsonl` file below it, in sorted path order.
"""

import json
import re
from pathlib import Path

from titan_cp.errors import UserError

SUFFIXES = (".txt", ".jsonl")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def read_documents(path: str | Path) -> list[str]:
    """All documents under `path`, in a fixed order; raises UserError naming the bad file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"training.dataset_path: folder {path} has no .txt or .jsonl files")
    elif path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(
                f"training.dataset_path: {path} is neither a .txt nor a .jsonl file (nor a folder of them)"
            )
        files = [path]
    else:
        raise UserError(f"training.dataset_path: {path} does not exist")
    documents: list[str] = []
    for file in files:
        text = _read_utf8(file)
        documents += _jsonl_documents(file, text) if file.suffix == ".jsonl" else _txt_documents(text)
    return documents


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"training.dataset_path: {file} is not UTF-8 text"
            f" (invalid byte 0x{data[e.start]:02x} at byte offset {e.start})"
        ) from None


def _txt_documents(text: str) -> list[str]:
    blocks = _BLANK_LINES.split(text.replace("\r\n", "\n"))
    return [b.strip("\n") for b in blocks if b.strip()]


def _jsonl_documents(file: Path, text: str) -> list[str]:
    documents = []
    # Split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"training.dataset_path: {file} line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(
                f"training.dataset_path: {file} line {number} has no 'text' string field"
            )
        documents.append(record["text"])
    return documents
