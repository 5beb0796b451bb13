"""Records to encoded batches, in input order: in this process or spread over worker processes.

Worker processes are spawned (a fork would copy the parent's threads and tokenizer state), and
this module imports neither torch nor the trainer, so a worker starts in a fraction of a second.
"""

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from titan_cp.data.cache import EncodedBatch, to_arrays
from titan_cp.data.documents import read_documents
from titan_cp.data.tokenizer import Tokenizer

RECORDS_PER_BATCH = 2048


class TextEncoder:
    """Plain text documents: BOS + tokens + EOS, every token but the first a target."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.format = "text"

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[bool]]]:
        t = self.tokenizer
        out = []
        for ids in t.encode_batch(texts):
            if ids:
                out.append(([t.bos_id, *ids, t.eos_id], [False] + [True] * (len(ids) + 1)))
        return out

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(Path(self.tokenizer.path).read_bytes()).hexdigest()
        return {"tokenizer_sha256": digest, "format": "text"}


def record_batches(dataset_path: str) -> Iterator[list]:
    """The dataset's records in order, RECORDS_PER_BATCH at a time, read as a stream."""
    records = iter(read_documents(dataset_path))
    while batch := list(islice(records, RECORDS_PER_BATCH)):
        yield batch


_worker_encoder: TextEncoder | None = None


def _init_worker(encoder: TextEncoder) -> None:
    global _worker_encoder
    # One process per core already: the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


def _encode_in_worker(records: list) -> EncodedBatch:
    assert _worker_encoder is not None
    return to_arrays(_worker_encoder.encode_batch(records))


def encoded_batches(batches: Iterator[list], encoder: TextEncoder, workers: int) -> Iterator[EncodedBatch]:
    """The encoded record batches in input order, encoded in-process or by `workers` processes.

    The first batch is always encoded here: it fixes the encoder's format (format `auto` decides
    from the first record), and the workers then receive an encoder that has decided.
    """
    first = next(batches, None)
    if first is None:
        return
    yield to_arrays(encoder.encode_batch(first))
    if workers <= 1:
        for batch in batches:
            yield to_arrays(encoder.encode_batch(batch))
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (encoder,)) as pool:
        pending: deque = deque()
        # At most 2 batches per worker in flight: reading never runs far ahead of encoding.
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
