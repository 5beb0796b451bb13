import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("planted failure")


def test_run_distributed_collects_every_rank():
    assert run_distributed(_all_reduce_rank, 3) == [3.0, 3.0, 3.0]


def test_run_distributed_reports_a_failing_rank():
    with pytest.raises(AssertionError, match="planted failure"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def _return_a_tensor(rank: int, world_size: int) -> torch.Tensor:
    return torch.full((3,), float(rank))


def test_run_distributed_returns_tensors():
    results = run_distributed(_return_a_tensor, 2)
    assert torch.equal(results[1], torch.ones(3))
