"""The token cache: a dataset tokenized once, kept on disk, read by every rank of every later run.

One cache is a folder `<root>/<key>/` (docs/data.md, "Token cache"):

    tokens.bin   uint32, every document's token ids back to back
    mask.bin     uint8, 1 where the token is a target (predicted from the tokens before it in
                 its document); a document's first token is never a target
    offsets.npy  int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json    counts, the key's inputs and a digest of the contents
    plans/       packing plans, one file per (seq_len, truncation), added when first needed

The key hashes everything the contents depend on: the dataset files (names, sizes, modification
times), the encoder's fingerprint (tokenizer files, format, train_on_inputs, chat template) and
this module's format version. A folder is written under a temporary name and renamed into place
only when complete, so a crash never leaves a cache that looks valid.

This module writes caches and imports no torch (the encoding workers use it); `cache_reader.py`
reads them.
"""

import hashlib
import json
import shutil
import uuid
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from titan_cp.data.records import dataset_files

CACHE_VERSION = 1
CACHE_FOLDER_NAME = ".titan_cp_cache"

# One encoded document: its token ids and, per token, whether it is a target.
EncodedDocument = tuple[list[int], list[bool]]


def cache_key(dataset_path: str | Path, encoder_fingerprint: dict) -> str:
    """A hex digest of everything the cached tokens depend on; UserError for a missing or bad path."""
    path = Path(dataset_path).resolve()
    files = []
    for file in dataset_files(path):
        stat = file.stat()
        files.append([file.relative_to(path).as_posix() if path.is_dir() else file.name, stat.st_size, stat.st_mtime_ns])
    inputs = {"version": CACHE_VERSION, "dataset": str(path), "files": files, "encoder": encoder_fingerprint}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(dataset_path: str | Path, cache_dir: str) -> Path:
    """`cache_dir` if given, else a hidden folder next to the dataset (beside a file, inside a folder's parent)."""
    if cache_dir:
        return Path(cache_dir)
    return Path(dataset_path).resolve().parent / CACHE_FOLDER_NAME


@dataclass
class EncodedBatch:
    """Encoded documents as flat arrays: cheap to pass between processes and to write."""

    tokens: np.ndarray  # uint32 [total]
    mask: np.ndarray  # bool [total]
    lengths: np.ndarray  # int64 [documents], each > 0


def to_arrays(documents: list[EncodedDocument]) -> EncodedBatch:
    """Flatten documents (empty ones dropped); a document's first token is never a target, since
    nothing precedes it: sample assembly relies on this to stop labels at document boundaries."""
    documents = [(ids, mask) for ids, mask in documents if ids]
    lengths = np.fromiter((len(ids) for ids, _ in documents), dtype=np.int64, count=len(documents))
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(ids for ids, _ in documents), dtype=np.uint32, count=total)
    mask = np.fromiter(chain.from_iterable(m for _, m in documents), dtype=np.bool_, count=total)
    mask[np.cumsum(lengths) - lengths] = False
    return EncodedBatch(tokens, mask, lengths)


class _Writer:
    """Appends encoded batches to the cache files and hashes them on the way."""

    def __init__(self, folder: Path) -> None:
        self.tokens = open(folder / "tokens.bin", "wb")
        self.mask = open(folder / "mask.bin", "wb")
        self.lengths = array("q")
        self.num_tokens = 0
        self.num_targets = 0
        self.digest = hashlib.sha256()

    def add(self, batch: EncodedBatch) -> None:
        token_bytes = batch.tokens.tobytes()
        mask_bytes = batch.mask.view(np.uint8).tobytes()
        self.tokens.write(token_bytes)
        self.mask.write(mask_bytes)
        self.digest.update(token_bytes)
        self.digest.update(mask_bytes)
        self.lengths.extend(batch.lengths.tolist())
        self.num_tokens += len(batch.tokens)
        self.num_targets += int(batch.mask.sum())

    def close(self) -> tuple[np.ndarray, int, str]:
        self.tokens.close()
        self.mask.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        self.digest.update(offsets.tobytes())
        return offsets, self.num_targets, self.digest.hexdigest()


def write_cache(
    folder: Path,
    batches: Iterable[EncodedBatch],
    meta: Callable[[], dict],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the encoded batches into cache `folder` (which must not exist yet), atomically.

    `meta()` gives the extra meta.json entries once all batches are written. `progress(documents,
    tokens)` is called after each batch. If another process completes the
    same folder first, its copy is kept and ours is discarded (the contents are the same).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _Writer(tmp)
        for batch in batches:
            writer.add(batch)
            if progress is not None:
                progress(len(writer.lengths), writer.num_tokens)
        offsets, num_targets, digest = writer.close()
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "plans").mkdir()
        full_meta = {
            **meta(),
            "version": CACHE_VERSION,
            "documents": len(offsets) - 1,
            "tokens": int(offsets[-1]),
            "targets": num_targets,
            "content_digest": digest,
        }
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, sort_keys=True) + "\n")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(folder: Path) -> bool:
    """meta.json is written last into the temporary folder, so a folder under its final name with
    meta.json is complete."""
    return (folder / "meta.json").is_file()
