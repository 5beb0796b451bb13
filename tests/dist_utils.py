"""Run a test body in several CPU processes joined by a gloo process group.

`run_distributed(fn, world_size, *args)` starts `world_size` spawned processes, each calls
`fn(rank, world_size, *args)` inside an initialised gloo group, and returns the list of the
values each rank returned (tensors included). An exception on any rank fails the test with that
rank's traceback; a hang fails it after `timeout` seconds.
"""

import datetime
import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # One thread per rank: the ranks share the machine's few cores.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
        )
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data into the bytes; the queue's own pickler would share
        # storage that disappears when this process exits.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while len(results) + len(failures) < world_size:
        if datetime.datetime.now() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            procs[0].join(0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = pickle.loads(value)
        else:
            failures.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    if failures:
        raise AssertionError("distributed test failed\n" + "\n".join(failures))
    if len(results) < world_size:
        raise AssertionError(f"distributed test: only ranks {sorted(results)} of {world_size} finished")
    return [results[r] for r in range(world_size)]
