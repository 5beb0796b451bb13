import time

import pytest
import torch
import torch.distributed as dist

from titan_cp.config.schema import Parallelism
from titan_cp.errors import UserError
from titan_cp.parallel import ParallelDims, set_collective_timeout
from tests.dist_utils import run_distributed


def dims(world: int, processes_per_node: int | None = None, **kw) -> ParallelDims:
    return ParallelDims.from_config(Parallelism(**kw), world, processes_per_node)


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
        "fsdp": dist.get_process_group_ranks(fsdp_cp.fsdp.get_group("shard")),
        "hsdp_shard": dist.get_process_group_ranks(hsdp_cp.fsdp.get_group("shard")),
        "hsdp_replicate": dist.get_process_group_ranks(hsdp_cp.fsdp.get_group("replicate")),
    }


def test_meshes_group_the_right_ranks():
    results = run_distributed(_meshes, 4)
    assert [r["cp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert results[0]["fsdp"] == [0, 1, 2, 3]
    assert results[2]["hsdp_shard"] == [2, 3] and results[2]["hsdp_replicate"] == [0, 2]


def test_fsdp_shards_within_a_node_when_its_group_spans_nodes():
    # 2 nodes of 8, cp 16: one node's 8 ranks hold the shards, the 2 nodes replicate them.
    spanning = dims(16, processes_per_node=8, context_parallel_degree=16)
    assert (spanning.fsdp_shard, spanning.fsdp_replicate) == (8, 2)
    across = dims(16, processes_per_node=8, context_parallel_degree=16, fsdp_shard_within_node=False)
    assert (across.fsdp_shard, across.fsdp_replicate) == (16, 1)
    # A group inside a node is left as it was (the other ranks replicate, as before).
    for replicate, shard in ((2, 2), (4, 1)):
        inside = dims(16, processes_per_node=8, data_parallel_replicate_degree=replicate,
                      data_parallel_shard_degree=shard, context_parallel_degree=4)  # fmt: skip
        assert (inside.fsdp_shard, inside.fsdp_replicate) == (shard * 4, replicate)


def test_a_shard_group_that_cannot_follow_the_nodes_is_refused_in_one_line():
    # 12 ranks of dp_shard x cp on nodes of 8: neither divides the other.
    with pytest.raises(UserError) as info:
        dims(24, processes_per_node=8, data_parallel_replicate_degree=2, context_parallel_degree=12)
    message = str(info.value)
    assert "\n" not in message
    for word in ("parallelism.fsdp_shard_within_node", "dp_shard x cp = 12", "nodes of 8", "false"):
        assert word in message


def _fsdp_groups(rank: int, world_size: int, processes_per_node: int) -> dict:
    """The fsdp mesh's layout and this rank's group per dim, cp 4, with the key on and off."""
    layouts = {}
    for within_node in (True, False):
        parallelism = Parallelism(context_parallel_degree=4, fsdp_shard_within_node=within_node)
        meshes = ParallelDims.from_config(parallelism, world_size, processes_per_node).build_meshes("cpu")
        groups = {dim: dist.get_process_group_ranks(meshes.fsdp.get_group(dim)) for dim in meshes.fsdp.mesh_dim_names}
        cp_group = dist.get_process_group_ranks(meshes.cp.get_group())
        layouts[within_node] = {"mesh": meshes.fsdp.mesh.tolist(), "cp": cp_group, **groups}
    return layouts


WHOLE_GROUP = {"mesh": [0, 1, 2, 3], "cp": [0, 1, 2, 3], "shard": [0, 1, 2, 3]}


def test_fsdp_mesh_shards_over_the_node_and_replicates_across_nodes():
    # 4 processes as 2 nodes of 2, cp 4 spanning both.
    results = run_distributed(_fsdp_groups, 4, 2)
    within = [r[True] for r in results]
    assert within[0]["mesh"] == [[0, 1], [2, 3]]
    assert [r["shard"] for r in within] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["replicate"] for r in within] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["cp"] == [0, 1, 2, 3] for r in within)
    # Switched off, FSDP shards over the whole cp group across the nodes.
    assert all(r[False] == WHOLE_GROUP for r in results)


def test_fsdp_mesh_is_the_whole_group_on_one_node():
    assert all(r[True] == WHOLE_GROUP and r[False] == WHOLE_GROUP for r in run_distributed(_fsdp_groups, 4, 4))


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
