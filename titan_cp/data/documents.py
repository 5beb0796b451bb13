"""The texts of a text dataset, for the in-memory loader (`loader.py`).

Records come from `titan_cp.data.records` (every file format it reads); each needs a `text`
string. Chat and instruction formats are encoded, with their target masks, by
`titan_cp.data.formats`.
"""

from pathlib import Path

from titan_cp.data.records import iter_records
from titan_cp.errors import UserError


def read_documents(path: str | Path) -> list[str]:
    """All document texts under `path`, in a fixed order; raises UserError naming the bad record."""
    texts = []
    for record in iter_records(path):
        text = record.data.get("text")
        if not isinstance(text, str):
            raise UserError(f"training.dataset_path: {record.where} has no 'text' string field")
        texts.append(text)
    return texts
