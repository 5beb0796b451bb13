"""Sequence sharding layouts, their round trips, and ContextParallel's choices and refusals."""

import pytest
import torch

from titan_cp.config.schema import Parallelism
from titan_cp.context_parallel import ContextParallel, shard, unshard, validate_seq_len
from titan_cp.errors import UserError


class _StubCpMesh:
    """Stands in for a 1-D cp DeviceMesh where no process group is needed (validation only)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank

    def get_group(self):
        return None


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_rank_holds_chunk_r_and_its_mirror(cp):
    seq = torch.arange(2 * cp * 3).view(1, -1)  # chunks of 3 tokens
    for rank in range(cp):
        mirror = 2 * cp - 1 - rank
        expected = list(range(3 * rank, 3 * rank + 3)) + list(range(3 * mirror, 3 * mirror + 3))
        assert shard(seq, rank, cp, "zigzag").flatten().tolist() == expected


def test_contiguous_rank_holds_its_slice():
    seq = torch.arange(12).view(1, 12)
    assert [shard(seq, r, 3, "contiguous").flatten().tolist() for r in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_unshard_round_trip(layout, cp):
    x = torch.randn(2, 32, 3, 5)
    shards = [shard(x, r, cp, layout) for r in range(cp)]
    assert all(s.shape == (2, 32 // cp, 3, 5) and s.is_contiguous() for s in shards)
    assert torch.equal(unshard(shards, layout), x)
    # Every token lands on exactly one rank.
    ids = torch.arange(32).expand(2, 32)
    assert sorted(torch.cat([shard(ids, r, cp, layout)[0] for r in range(cp)]).tolist()) == list(range(32))


def test_shard_rejects_indivisible_tensors():
    with pytest.raises(ValueError, match="divisible by 4"):
        shard(torch.zeros(1, 6), 0, 2, "zigzag")


def test_validate_seq_len_messages():
    with pytest.raises(UserError) as info:
        validate_seq_len(1020, 4, "zigzag")
    assert str(info.value) == (
        "training.seq_len 1020 must be divisible by 2*cp = 8 for"
        " parallelism.context_parallel_load_balancer = zigzag"
    )
    with pytest.raises(UserError, match="training.seq_len 10 must be divisible by cp = 4"):
        validate_seq_len(10, 4, "contiguous")
    validate_seq_len(1024, 4, "zigzag")
    validate_seq_len(12, 4, "contiguous")


def _cp(cp: int, packing: bool = False, **parallelism) -> ContextParallel:
    mesh = _StubCpMesh(cp) if cp > 1 else None
    return ContextParallel(mesh, Parallelism(**parallelism), "auto", packing, torch.device("cpu"))


def test_algorithm_and_layout_choices():
    assert (_cp(1).algorithm, _cp(1).layout) == ("local", "contiguous")
    assert (_cp(2).algorithm, _cp(2).layout) == ("batch_ring", "zigzag")
    none = _cp(2, context_parallel_load_balancer="none")
    assert (none.algorithm, none.layout) == ("batch_ring", "contiguous")
    assert (_cp(2, True).algorithm, _cp(2, True).layout) == ("varlen_llama3", "contiguous")
    assert _cp(1, True).algorithm == "varlen_llama3"  # documents are masked at cp=1 too
    assert _cp(2, ring_attn_func="varlen_llama3").algorithm == "varlen_llama3"


def test_validate_refuses_batch_ring_with_packing():
    with pytest.raises(UserError, match="batch_ring cannot mask packed documents") as info:
        _cp(2, True, ring_attn_func="batch_ring").validate(64, 8)
    assert "\n" not in str(info.value)


def test_validate_heads_k_stride_must_divide_kv_heads():
    with pytest.raises(UserError, match="parallelism.heads_k_stride 3 must divide the model's 8 KV heads"):
        _cp(2, True, heads_k_stride=3).validate(64, 8)
    _cp(2, True, heads_k_stride=4).validate(64, 8)


def test_validate_seq_len_follows_the_layout():
    with pytest.raises(UserError, match="2\\*cp = 8"):
        _cp(4).validate(36, 8)
    _cp(4, context_parallel_load_balancer="none").validate(36, 8)
    _cp(4).validate(64, 8)
