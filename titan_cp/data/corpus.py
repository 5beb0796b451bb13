"""A dataset's token cache: found by its key, or built once per node while the other ranks wait.

`open_corpus` is called by every rank. Under torch.distributed, local rank 0 of each node builds
what is missing (the cache, then the packing plan) and writes a status file into the node's
temporary folder (writable even when the cache folder is not); the node's other ranks wait for
that file, with no collective, so a build may take longer than any collective timeout. The
status file's name carries a token rank 0 broadcasts at the start, so a status left by an
earlier run is never mistaken for this run's, and the node's rank (torchrun's GROUP_RANK), so
nodes sharing a temporary folder (two launches on one host) wait each for their own leader. A
build that fails on a user mistake (a bad record, an unwritable cache folder) reports the same
one-line error on every rank.

Encoding runs in this process here; `scripts/prepare_data.py` spreads it over all cores
(`encode_pool.py`), with the same result.
"""

import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from titan_cp.data.cache import cache_key, cache_root, is_complete, write_cache
from titan_cp.data.cache_reader import TokenCache
from titan_cp.data.encode_pool import encoded_batches, record_batches
from titan_cp.data.formats import Encoder
from titan_cp.errors import UserError

_STATUS_PREFIX = "titan_cp_cache_status-"
_STALE_STATUS_SECONDS = 3600


def corpus_folder(dataset_path: str, cache_dir: str, encoder: Encoder) -> Path:
    """Where the cache of this dataset under this encoder lives (it may not exist yet)."""
    return cache_root(dataset_path, cache_dir) / cache_key(dataset_path, encoder.fingerprint())


def build_corpus(
    dataset_path: str,
    folder: Path,
    encoder: Encoder,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Tokenize the dataset into cache `folder` unless it is already complete."""
    if is_complete(folder):
        return
    batches = encoded_batches(record_batches(dataset_path), encoder, workers)
    meta = {"dataset_path": str(Path(dataset_path).resolve()), "encoder": encoder.fingerprint()}
    write_cache(folder, batches, lambda: {**meta, "format": encoder.format}, progress)


def on_local_leader(work: Callable[[], None]) -> None:
    """Run `work` on local rank 0 of each node while the node's other ranks wait for its outcome.

    Called by every rank (it broadcasts once). Without torch.distributed, just runs `work`.
    """
    if not dist.is_initialized():
        work()
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    node = os.environ.get("GROUP_RANK", "0")
    status = Path(tempfile.gettempdir()) / f"{_STATUS_PREFIX}{token[0]}-node{node}"
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
    for old in status.parent.glob(f"{_STATUS_PREFIX}*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_STATUS_SECONDS:
                old.unlink(missing_ok=True)
        except FileNotFoundError:  # another node's leader on this host renamed or removed it
            continue
    tmp = status.with_name(f"{status.name}.tmp")
    tmp.write_text(text)
    tmp.replace(status)


def open_corpus(
    dataset_path: str, cache_dir: str, encoder: Encoder, key: str, then: Callable[[TokenCache], None] | None = None
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

    on_local_leader(build)
    cache = TokenCache(folder)
    if cache.num_tokens and cache.num_targets == 0:
        raise UserError(
            f"{key}: {dataset_path} has no target token in any of its {cache.num_documents} records (format"
            f" {cache.meta['format']}); give records with assistant / output / completion text, or set"
            " training.train_on_inputs = true"
        )
    return cache
