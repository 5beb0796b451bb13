import time

import pytest
import torch
import torch.distributed as dist

from titan_cp.config.schema import Parallelism
from titan_cp.errors import UserError
from titan_cp.parallel import ParallelDims, set_collective_timeout
from tests.dist_utils import run_distributed


def dims(world: int, **kw) -> ParallelDims:
    return ParallelDims.from_config(Parallelism(**kw), world)


def test_shard_degree_fills_the_world():
    d = dims(8, data_parallel_replicate_degree=2, context_parallel_degree=2)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.dp) == (2, 2, 2, 4)
    assert [d.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    "world, kw, words",
    [
        (4, dict(data_parallel_shard_degree=3), ["dp_shard 3", "world size is 4"]),
        (6, dict(context_parallel_degree=4), ["world size 6", "context_parallel_degree 4"]),
    ],
)
def test_bad_degrees_name_the_numbers(world, kw, words):
    with pytest.raises(UserError) as info:
        dims(world, **kw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def _meshes(rank: int, world_size: int) -> dict:
    fsdp_cp = dims(world_size, context_parallel_degree=2).build_meshes("cpu")
    hsdp_cp = dims(world_size, data_parallel_replicate_degree=2, context_parallel_degree=2).build_meshes("cpu")
    return {
        "cp": dist.get_process_group_ranks(fsdp_cp.cp.get_group()),
        "fsdp": dist.get_process_group_ranks(fsdp_cp.fsdp.get_group("dp_shard_cp")),
        "hsdp_shard": dist.get_process_group_ranks(hsdp_cp.fsdp.get_group("dp_shard_cp")),
        "hsdp_replicate": dist.get_process_group_ranks(hsdp_cp.fsdp.get_group("dp_replicate")),
    }


def test_meshes_group_the_right_ranks():
    results = run_distributed(_meshes, 4)
    assert [r["cp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert results[0]["fsdp"] == [0, 1, 2, 3]
    assert results[2]["hsdp_shard"] == [2, 3] and results[2]["hsdp_replicate"] == [0, 2]


def _collective_with_a_silent_peer(rank: int, world_size: int) -> float:
    # set_collective_timeout relies on the private _set_pg_timeout (distributed.py says why):
    # if it stops working, rank 0 waits the default 60 s and this test fails.
    set_collective_timeout(2)
    if rank == 1:
        time.sleep(12)
        return 0.0
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        dist.all_reduce(torch.ones(1))
    return time.monotonic() - start


def test_collective_timeout_ends_a_wait_for_a_dead_rank():
    waited = run_distributed(_collective_with_a_silent_peer, 2, timeout=60)[0]
    assert waited < 10
