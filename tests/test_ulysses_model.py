"""Ulysses and hybrid cp give the same model math as cp = 1 (invariants 1-5 in docs/architecture.md).

A tiny Llama (8 query / 2 KV heads) is built and stepped as the trainer does
(tests/cp_model_utils.py): pure Ulysses over 2 ranks on plain windows and on packed documents,
and the hybrid of 2 ring ranks x 2 Ulysses ranks (cp = 4) on both. The summed loss and the
gradient of every parameter must equal one process without cp or FSDP within 1e-5 relative.
One spawned run per world size covers its cases.
"""

import pytest
import torch

from tests import cp_model_utils as cpm
from tests.dist_utils import run_distributed
from tests.test_cp_model import _assert_same_math, deterministic
from titan_cp.context_parallel import ContextParallel
from titan_cp.parallel import ParallelDims

CPU = torch.device("cpu")
PLAIN = cpm.Case("plain")
PACKED = cpm.Case("packed", sample_packing=True)
WORLD_CASES = {
    2: [cpm.Case("ulysses2", ulysses=2), cpm.Case("ulysses2_packed", sample_packing=True, ulysses=2)],
    4: [cpm.Case("hybrid2x2", ulysses=2), cpm.Case("hybrid2x2_packed", sample_packing=True, ulysses=2)],
}
EXPECTED_ATTENTION = {  # (ContextParallel.algorithm, layout, ring ranks)
    "ulysses2": ("local", "contiguous", 1),
    "ulysses2_packed": ("varlen_llama3", "contiguous", 1),
    "hybrid2x2": ("batch_ring", "zigzag", 2),
    "hybrid2x2_packed": ("varlen_llama3", "zigzag", 2),
}


def _batch(case: cpm.Case):
    return cpm.packed_batch() if case.sample_packing else cpm.plain_batch()


def _step(cp: ContextParallel, dims: ParallelDims, meshes, case: cpm.Case) -> dict:
    cp.validate(cpm.SEQ_LEN, cpm.TINY_ARGS.n_kv_heads, cpm.TINY_ARGS.n_heads)
    model = cpm.build_model(cp, dims, meshes.fsdp if meshes else None, case)
    cpm.sharpen_attention(model)
    loss = cpm.forward_backward(model, case, cp.shard(*_batch(case)))
    return {
        "attention": (cp.algorithm, cp.layout, cp.ring),
        "loss": loss,
        "params": cpm.full_params(model),
        "grads": cpm.full_grads(model),
    }


def _world_run(rank: int, world_size: int, cases: list[cpm.Case]) -> dict:
    torch.use_deterministic_algorithms(True)
    results = {}
    for case in cases:
        dims = ParallelDims.from_config(case.parallelism(world_size), world_size)
        meshes = dims.build_meshes("cpu")
        cp = ContextParallel(meshes.cp, case.parallelism(world_size), "auto", case.sample_packing, CPU)
        result = _step(cp, dims, meshes, case)
        if rank != 0:  # full tensors are the same on every rank; rank 0 sends them back
            result["params"] = result["grads"] = None
        results[case.name] = result
    return results


@pytest.fixture(scope="module")
def references() -> dict:
    refs = {}
    for case in (PLAIN, PACKED):
        parallelism = case.parallelism(1)
        with deterministic():
            cp = ContextParallel(None, parallelism, "auto", case.sample_packing, CPU)
            refs[case.sample_packing] = _step(cp, ParallelDims.from_config(parallelism, 1), None, case)
    return refs


@pytest.fixture(scope="module")
def cp_runs() -> dict:
    runs = {}
    for world_size, cases in WORLD_CASES.items():
        per_rank = run_distributed(_world_run, world_size, cases, timeout=300)
        for name, result in per_rank[0].items():
            losses = {r[name]["loss"] for r in per_rank}
            assert len(losses) == 1, f"cp={world_size} {name}: ranks disagree on the all-reduced loss {losses}"
            assert result["attention"] == EXPECTED_ATTENTION[name], (name, result["attention"])
        runs.update(per_rank[0])
    return runs


CASES = [(w, c) for w, cases in WORLD_CASES.items() for c in cases]


@pytest.mark.parametrize("world_size, case", CASES, ids=[case.name for _, case in CASES])
def test_ulysses_loss_and_gradients_equal_cp1(cp_runs, references, world_size, case):
    _assert_same_math(cp_runs[case.name], references[case.sample_packing], f"cp={world_size} {case.name}")
