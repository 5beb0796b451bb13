"""Read access to a complete token cache folder (the layout: `cache.py`).

Samples are read with positioned reads (`os.pread`), not through a memory map: mapped pages
count into a process's resident memory and would grow to the size of the files over an epoch,
while positioned reads go through the page cache the node's ranks share.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from titan_cp.loss import IGNORE_INDEX


@dataclass
class Span:
    """Inputs and labels of `length` consecutive tokens starting at flat index `start`."""

    tokens: np.ndarray  # int64 [length]
    labels: np.ndarray  # int64 [length], IGNORE_INDEX where the next token is not a target


class TokenCache:
    """Read access to one complete cache folder; opening it reads only meta.json and the offsets."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self._tokens_fd = os.open(folder / "tokens.bin", os.O_RDONLY)
        self._mask_fd = os.open(folder / "mask.bin", os.O_RDONLY)

    def __del__(self) -> None:
        for fd in (getattr(self, "_tokens_fd", None), getattr(self, "_mask_fd", None)):
            if fd is not None:
                os.close(fd)

    @property
    def num_documents(self) -> int:
        return self.meta["documents"]

    @property
    def num_tokens(self) -> int:
        return self.meta["tokens"]

    @property
    def num_targets(self) -> int:
        return self.meta["targets"]

    @property
    def digest(self) -> str:
        return self.meta["content_digest"]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """uint32 token ids [start, stop), clipped to the end of the data."""
        stop = min(stop, self.num_tokens)
        return np.frombuffer(os.pread(self._tokens_fd, 4 * (stop - start), 4 * start), dtype=np.uint32)

    def mask(self, start: int, stop: int) -> np.ndarray:
        """Target flags [start, stop), clipped to the end of the data."""
        stop = min(stop, self.num_tokens)
        return np.frombuffer(os.pread(self._mask_fd, stop - start, start), dtype=np.bool_)

    def span(self, start: int, length: int) -> Span:
        """Tokens [start, start + length) and their labels: label j is token j + 1 when that token is
        a target, else IGNORE_INDEX. A document's first token is never a target, so labels stop
        at document boundaries by themselves; the last token of the data has no label."""
        ids = self.tokens(start, start + length + 1).astype(np.int64)
        targets = self.mask(start + 1, start + length + 1)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        labels[: len(targets)] = np.where(targets, ids[1:], IGNORE_INDEX)
        return Span(ids[:length], labels)
