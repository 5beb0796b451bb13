"""The texts of a text dataset as a list, for tools that want plain documents (a benchmark's corpus).

Records come from `titan_cp.data.records` (every file format it reads); each needs a `text`
string. Training encodes datasets through `titan_cp.data.formats` instead, with target masks.
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
