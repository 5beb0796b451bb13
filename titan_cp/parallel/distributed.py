"""Process-group start-up with timeouts, so a dead rank ends the job instead of hanging it."""

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from titan_cp.errors import UserError


def init_distributed(device: torch.device, init_timeout_seconds: int) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); return (rank, world)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if "MASTER_ADDR" not in os.environ:
        # Started without torchrun: a one-process group keeps the code path the same.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=init_timeout_seconds),
        device_id=device if device.type == "cuda" else None,
    )
    return rank, world_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_collective_timeout(seconds: int) -> None:
    """Shorten the timeout of every process group once the slow first step is done.

    torch has no public API to change a live group's timeout; `_set_pg_timeout` is what
    torchtitan uses too. tests/test_parallel_dims.py fails loudly if it disappears.
    """
    timeout = datetime.timedelta(seconds=seconds)
    for group in distributed_c10d._world.pg_map:
        distributed_c10d._set_pg_timeout(timeout, group)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Judged on the node's process count, not this rank's index, so that every rank raises
        # (a rank with a valid index would otherwise wait for the others until the timeout).
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
        visible = torch.cuda.device_count()
        if per_node > visible:
            raise UserError(
                f"NGPU={per_node} processes per node but only {visible} GPU(s) are visible;"
                f" set NGPU to at most {visible} (or CUDA_VISIBLE_DEVICES to more GPUs)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
