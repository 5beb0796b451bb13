"""A dataset's token cache: found by its key, or built once per node while the other ranks wait.

`open_corpus` is called by every rank. Under torch.distributed, local rank 0 of each node builds
what is missing (the cache, then the packing plan) and writes a status file; the node's other
ranks wait for that file. The status file's name carries a token rank 0 broadcasts at the start,
so a status left by an earlier run is never mistaken for this run's. A build that fails on a
user mistake (a bad record, say) reports the same one-line error on every rank.

Encoding is done in batches of records; `scripts/prepare_data.py` spreads the batches over
worker processes (spawned, each with its own tokenizer) and writes their results in input order,
so the cache is the same for any number of workers.
"""

import hashlib
import multiprocessing
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch.distributed as dist

from titan_cp.data.cache import EncodedBatch, TokenCache, cache_key, cache_root, is_complete, to_arrays, write_cache
from titan_cp.data.documents import read_documents
from titan_cp.data.tokenizer import Tokenizer
from titan_cp.errors import UserError

RECORDS_PER_BATCH = 2048
_STALE_STATUS_SECONDS = 3600


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


def corpus_folder(dataset_path: str, cache_dir: str, encoder: TextEncoder) -> Path:
    """Where the cache of this dataset under this encoder lives (it may not exist yet)."""
    return cache_root(dataset_path, cache_dir) / cache_key(dataset_path, encoder.fingerprint())


def build_corpus(
    dataset_path: str,
    folder: Path,
    encoder: TextEncoder,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Tokenize the dataset into cache `folder` unless it is already complete."""
    if is_complete(folder):
        return
    batches = encoded_batches(record_batches(dataset_path), encoder, workers)
    meta = {"dataset_path": str(Path(dataset_path).resolve()), "encoder": encoder.fingerprint()}
    write_cache(folder, batches, lambda: {**meta, "format": encoder.format}, progress)


def on_local_leader(status_dir: Path, work: Callable[[], None]) -> None:
    """Run `work` on local rank 0 of each node while the node's other ranks wait for its outcome.

    Called by every rank (it broadcasts once). Without torch.distributed, just runs `work`.
    """
    if not dist.is_initialized():
        work()
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    status = status_dir / f".status-{token[0]}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            work()
        except BaseException as error:
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            _write_status(status, "error " + " ".join(message.split()))
            raise
        _write_status(status, "ok")
        return
    while not status.is_file():
        time.sleep(0.1)
    outcome = status.read_text()
    if outcome != "ok":
        raise UserError(outcome.removeprefix("error "))


def _write_status(status: Path, text: str) -> None:
    status.parent.mkdir(parents=True, exist_ok=True)
    for old in status.parent.glob(".status-*"):
        if time.time() - old.stat().st_mtime > _STALE_STATUS_SECONDS:
            old.unlink(missing_ok=True)
    tmp = status.with_name(status.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(status)


def open_corpus(
    dataset_path: str, cache_dir: str, encoder: TextEncoder, key: str, then: Callable[[TokenCache], None] | None = None
) -> TokenCache:
    """The dataset's token cache, built first if needed; `then(cache)` runs on the builder too
    (to add a packing plan) before the other ranks go on. `key` names the config key in errors."""
    folder = corpus_folder(dataset_path, cache_dir, encoder)

    def build() -> None:
        try:
            build_corpus(dataset_path, folder, encoder)
        except PermissionError as e:
            raise UserError(
                f"training.dataset_cache_dir: cannot write the token cache of {key} {dataset_path} under"
                f" {folder.parent} ({e.strerror}); set training.dataset_cache_dir to a writable folder"
            ) from None
        if then is not None:
            then(TokenCache(folder))

    on_local_leader(folder.parent, build)
    cache = TokenCache(folder)
    if cache.num_tokens and cache.num_targets == 0:
        raise UserError(f"{key}: {dataset_path} has no target token in any record ({cache.num_documents} records)")
    return cache
