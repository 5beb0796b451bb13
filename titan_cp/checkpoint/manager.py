"""Resumable training checkpoints with torch.distributed.checkpoint (DCP).

Layout: `{dump_folder}/{checkpoint.folder}/step-{N}/` holds DCP's shard files, its `.metadata` and
our `meta.json`. A save writes into `step-{N}.tmp-{run id}`; only after every rank has finished
does global rank 0 rename it to `step-{N}`, so a folder with that exact name is always complete
and a save killed at any moment (even SIGKILL) never becomes the one a resume picks. The next
save removes such leftovers. Loading only reads. docs/checkpoint.md describes it for users.

What is saved: the model and optimizer as sharded DCP state (FSDP2 DTensors are resharded on
load), and, as small pickled blobs, the lr scheduler, `extra_state` (trainer counters), each
data-parallel rank's loader position and each global rank's RNG state.
"""

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata as package_metadata
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from titan_cp.config.schema import Checkpoint
from titan_cp.errors import UserError, first_error_of_any_rank, raise_on_every_rank

__all__ = ["CheckpointManager", "list_checkpoint_steps"]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Anything `save` leaves behind when killed: an unfinished write, a replaced or a pruned step.
_LEFTOVER_DIR = re.compile(r"^step-\d+\.tmp-")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def list_checkpoint_steps(folder: str) -> list[int]:
    """Steps of the complete checkpoints in `folder`, ascending ([] when the folder does not exist)."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(folder, name, ".metadata")):
            steps.append(int(match.group(1)))
    return sorted(steps)


class CheckpointManager:
    """Saves and restores everything a bit-identical resume needs.

    `save`, `maybe_save` and `load` are collectives: call them on every rank. Without a process
    group (one process) they work the same. `extra_state` is a dict the trainer may fill with
    small picklable values that are the same on every rank (token counters); it is saved with
    each checkpoint and restored by `load`.
    """

    def __init__(
        self,
        cfg: Checkpoint,
        dump_folder: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        lr_scheduler: Stateful | None,
        dataloader: Stateful | None,
        dp_rank: int,
        model_args: Any = None,
    ) -> None:
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.dataloader = dataloader
        self.dp_rank = dp_rank
        self.model_args = model_args
        self.extra_state: dict[str, Any] = {}
        self.rank = dist.get_rank() if _distributed() else 0
        self._run_id: str | None = None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    # ---------------------------------------------------------------- saving

    def maybe_save(self, step: int, last_step: bool = False) -> bool:
        """Save when checkpointing is on and `step` is a multiple of the interval or the last one."""
        if self.cfg.enable and (step % self.cfg.interval == 0 or last_step):
            return self.save(step)
        return False

    def save(self, step: int) -> bool:
        """Write `step-{step}` atomically and prune old ones; False (nothing written) when disabled."""
        if not self.cfg.enable:
            return False
        if self._run_id is None:
            # One name for the whole run, shared by every rank, so all write into the same folder.
            self._run_id = _from_rank0(uuid.uuid4().hex[:8])
        final = self.step_dir(step)
        tmp = f"{final}.tmp-{self._run_id}"
        if self.rank == 0:
            os.makedirs(self.folder, exist_ok=True)
            self._remove_leftovers(keep=tmp)
        dcp.save(self._state_to_save(), storage_writer=dcp.FileSystemWriter(tmp))
        _barrier()  # every rank's shard is on disk before the folder gets its final name
        if self.rank == 0:
            self._write_meta(tmp, step)
            self._publish(tmp, final)
            self._prune(step)
        _barrier()  # no rank moves on (or exits) before the checkpoint is visible
        return True

    def _state_to_save(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": get_model_state_dict(self.model), "extra": _pack(self.extra_state)}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = _pack(self.lr_scheduler.state_dict())
        if self.dataloader is not None:
            # Keyed by dp rank: the ranks of one cp group hold the same loader, and DCP writes a
            # key that several ranks share only once.
            state["dataloader"] = {f"dp{self.dp_rank}": _pack(self.dataloader.state_dict())}
        state["rng"] = {f"rank{self.rank}": _pack(_rng_state())}
        return state

    def _write_meta(self, folder: str, step: int) -> None:
        args = self.model_args
        if dataclasses.is_dataclass(args) and not isinstance(args, type):
            args = dataclasses.asdict(args)
        meta = {
            "step": step,
            "titan_cp_version": _titan_cp_version(),
            "torch_version": torch.__version__,
            "world_size": dist.get_world_size() if _distributed() else 1,
            "model_args": args,
        }
        path = os.path.join(folder, "meta.json")
        with open(path, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())

    def _publish(self, tmp: str, final: str) -> None:
        """Rename the finished folder to its final name; an existing one of that step is replaced."""
        replaced = None
        if os.path.exists(final):
            # A re-run of the same step (a resume from an earlier load_step): os.rename cannot
            # replace a non-empty folder, so move the old one aside as a leftover first.
            replaced = f"{final}.tmp-replaced-{self._run_id}"
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(self.folder)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_latest_k` complete checkpoints up to `step`.

        Checkpoints of later steps (left by a run that went further before a resume from an
        earlier load_step) are never deleted: they are the user's to judge.
        """
        keep = self.cfg.keep_latest_k
        if keep <= 0:
            return
        older = [s for s in list_checkpoint_steps(self.folder) if s <= step]
        for old in older[:-keep]:
            # Renamed first so a kill during the slow delete leaves a leftover, not a broken step.
            doomed = f"{self.step_dir(old)}.tmp-pruned-{self._run_id}"
            os.rename(self.step_dir(old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _remove_leftovers(self, keep: str) -> None:
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if _LEFTOVER_DIR.match(name) and path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- loading

    def load(self) -> int:
        """Restore the configured checkpoint; return its step, or 0 when there is none to resume.

        With checkpoint.load_step = -1 the newest checkpoint that loads completely is used: a
        damaged newer one (a cut-short or unreadable file) gets one warning line and is left on
        disk as it is. `initial_load_path` (weights for a fresh start) is the trainer's job.
        """
        if not self.cfg.enable:
            return 0
        candidates, error = _from_rank0(self._candidates())
        if error:
            raise UserError(error)
        for step in candidates:
            path = self.step_dir(step)
            damage = _from_rank0(_damage(path) if self.rank == 0 else None) or self._try_load(path)
            if damage is None:
                return step
            if step == candidates[-1]:
                raise UserError(
                    f"checkpoint {damage}; no complete checkpoint in {self.folder} loads: move the"
                    f" damaged step folder(s) away to start from scratch, or use another job.dump_folder"
                    if self.cfg.load_step == -1
                    else f"checkpoint {damage}; choose another checkpoint.load_step (-1: the newest that loads)"
                )
            if self.rank == 0:
                print(f"warning: checkpoint {damage}; left as it is, trying the next older checkpoint", flush=True)
        return 0

    def _candidates(self) -> tuple[list[int], str | None]:
        """(steps to try, newest first; [] for a fresh start, None) or ([], error message)."""
        steps = list_checkpoint_steps(self.folder)
        wanted = self.cfg.load_step
        if wanted == -1:
            return steps[::-1], None
        if wanted in steps:
            return [wanted], None
        available = ", ".join(map(str, steps)) if steps else "none"
        return [], (
            f"checkpoint.load_step {wanted}: no complete checkpoint step-{wanted} in {self.folder};"
            f" complete steps there: {available} (-1 resumes from the latest)"
        )

    def _try_load(self, path: str) -> str | None:
        """Load `path`; None on success, else what is damaged (the same on every rank).

        DCP gathers a failure to read any rank's shard into an exception on every rank, so all
        ranks leave together. A model mismatch is the user's mistake, not damage: it is raised.
        """
        try:
            self._load_full(path)
            error = None
        except UserError:
            raise
        # Any failure to read the files means damage. DCP's CheckpointException is a
        # BaseException, not an Exception.
        except (Exception, dcp.CheckpointException) as e:
            error = f"{path} is damaged ({_short_reason(e)})"
        return first_error_of_any_rank(error)

    def _load_full(self, path: str) -> None:
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state: dict[str, Any] = {"model": get_model_state_dict(self.model), "extra": b""}
        if self.optimizer is not None:
            # On a fresh optimizer this creates zero state (a step at lr 0) for DCP to fill in.
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = b""
        if self.dataloader is not None:
            # Every saved loader position is read (they are tiny), so a rank whose dp index the
            # checkpoint lacks can still resume when the loader state does not depend on it.
            state["dataloader"] = {k.split(".", 1)[1]: b"" for k in saved if k.startswith("dataloader.")}
        rng_key = f"rng.rank{self.rank}"
        if rng_key in saved:
            state["rng"] = {f"rank{self.rank}": b""}
        raise_on_every_rank(_tensor_mismatch(saved, state, path))

        dcp.load(state, storage_reader=dcp.FileSystemReader(path))

        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(_unpack(state["lr_scheduler"]))
        self.extra_state.clear()
        self.extra_state.update(_unpack(state["extra"]))
        if self.dataloader is not None:
            loader_state, error = self._own_loader_state(state["dataloader"], path)
            raise_on_every_rank(error)
            self.dataloader.load_state_dict(_unpack(loader_state))
        if "rng" in state:
            _set_rng_state(_unpack(state["rng"][f"rank{self.rank}"]))
        else:
            logger.warning("checkpoint %s has no RNG state for rank %d (world size changed?)", path, self.rank)

    def _own_loader_state(self, saved: dict[str, bytes], path: str) -> tuple[bytes, str | None]:
        own = f"dp{self.dp_rank}"
        if own in saved:
            return saved[own], None
        blobs = set(saved.values())
        if len(blobs) == 1:
            # Every saved dp rank stopped at the same place: the loader's position is global.
            return blobs.pop(), None
        ranks = sorted(int(key[2:]) for key in saved)
        return b"", (
            f"checkpoint {path} has data-loader state for dp ranks {ranks} but not for dp rank"
            f" {self.dp_rank}: resume with the data-parallel degree it was saved with"
            " (parallelism.data_parallel_shard_degree, parallelism.data_parallel_replicate_degree)"
        )


# -------------------------------------------------------------------- helpers


def _damage(path: str) -> str | None:
    """What makes the checkpoint folder `path` unloadable, found without loading it, or None.

    DCP's `.metadata` lists for every stored item its file, offset and length (`storage_data`,
    written by FileSystemWriter); a file shorter than an item's end was cut short (a full disk, a
    copy interrupted). Checked first so the message can name the file.
    """
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # an unreadable .metadata is damage, whatever the error
        return f"{os.path.join(path, '.metadata')} is damaged ({_short_reason(e)})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) < size:
            return f"{file} is damaged (cut short: {os.path.getsize(file)} of {size} bytes)"
    return None


def _short_reason(error: BaseException) -> str:
    """One line for an exception; for DCP's CheckpointException, the first failing rank's error."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _tensor_mismatch(saved: Mapping[str, Any], state: dict[str, Any], path: str) -> str | None:
    """The first tensor whose name or shape differs between `state` and the checkpoint, as a message.

    Done on DCP's metadata before loading, because DCP's own errors are multi-rank tracebacks.
    Tensor names are DCP's flattened keys (`model.layers.0.attention.wq.weight`).
    """
    hint = "it was written for another model (its meta.json has the model args); use a new job.dump_folder"
    ours = dict(_tensor_leaves(state))
    for key, tensor in ours.items():
        entry = saved.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            return f"checkpoint {path} has no tensor '{key}' that this model needs: {hint}"
        if tuple(entry.size) != tuple(tensor.shape):
            return (
                f"checkpoint {path}: tensor '{key}' has shape {list(entry.size)} there but"
                f" {list(tensor.shape)} in this model: {hint}"
            )
    for key, entry in saved.items():
        if isinstance(entry, TensorStorageMetadata) and key.startswith("model.") and key not in ours:
            return f"checkpoint {path} has tensor '{key}' that this model lacks: {hint}"
    return None


def _tensor_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(flattened key, tensor) pairs, named the way DCP flattens nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _tensor_leaves(value, f"{prefix}.{index}")


def _pack(obj: Any) -> bytes:
    """Small non-tensor state as one opaque DCP value, so loading needs no template of its shape."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(blob: bytes) -> Any:
    # Our own checkpoint: DCP unpickles its non-tensor values with weights_only=False as well.
    return torch.load(io.BytesIO(blob), weights_only=False)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank, so all ranks take the same decision."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_dir(path: str) -> None:
    """Make a rename durable across a power loss, not only a process kill."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _titan_cp_version() -> str:
    try:
        return package_metadata.version("titan_cp")
    except package_metadata.PackageNotFoundError:
        return "unknown"
