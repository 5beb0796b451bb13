"""Records to encoded batches, in input order: in this process or spread over worker processes.

Worker processes are spawned (a fork would copy the parent's threads and tokenizer state), and
this module imports neither torch nor the trainer, so a worker starts in a fraction of a second.
"""

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator

from titan_cp.data.cache import EncodedBatch, to_arrays
from titan_cp.data.formats import Encoder, batched
from titan_cp.data.records import Record, iter_records

RECORDS_PER_BATCH = 2048


def record_batches(dataset_path: str) -> Iterator[list[Record]]:
    """The dataset's records in order, RECORDS_PER_BATCH at a time, read as a stream."""
    return batched(iter_records(dataset_path), RECORDS_PER_BATCH)


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    # One process per core already: the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = encoder


def _encode_in_worker(records: list) -> EncodedBatch:
    assert _worker_encoder is not None
    return to_arrays(_worker_encoder.encode_batch(records))


def encoded_batches(batches: Iterator[list], encoder: Encoder, workers: int) -> Iterator[EncodedBatch]:
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
