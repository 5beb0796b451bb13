"""Ulysses and hybrid Ulysses x ring attention against full attention on the unsharded batch.

One spawned run of 4 gloo ranks builds the meshes as the trainer does (ParallelDims) and runs
`ContextParallel.attention` on each rank's shard, for pure Ulysses (u = 4, where the 2 KV heads
must be replicated) and the hybrid (2 ring ranks x u = 2, KV heads not replicated), on plain
causal windows and on packed documents. Out, dq, dk and dv must equal causal SDPA on the full
batch (per document when packed) within 1e-5; the reference never sees a shard.
"""

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed
from tests.test_varlen_attention import DOC_LENGTHS, SEQ, make_inputs, packed_positions, per_document_reference
from titan_cp.config.schema import Parallelism
from titan_cp.context_parallel import ContextParallel
from titan_cp.context_parallel.ulysses import kv_copies, validate_ulysses
from titan_cp.errors import UserError
from titan_cp.parallel import ParallelDims

CP = 4
WHOLE_WINDOWS = ([SEQ], [SEQ])  # no packing: one document per sample
# (name, ulysses degree, packed, load balancer)
CASES = [
    ("ulysses4", 4, False, "zigzag"),
    ("ulysses4_packed", 4, True, "zigzag"),
    ("hybrid2x2_zigzag", 2, False, "zigzag"),
    ("hybrid2x2_contiguous", 2, False, "none"),
    ("hybrid2x2_packed", 2, True, "zigzag"),
]
ATOL = 1e-5


def _case_run(rank: int, world_size: int, inputs: dict) -> dict:
    results = {}
    for name, ulysses, packed, balancer in CASES:
        parallelism = Parallelism(
            context_parallel_degree=CP, context_parallel_ulysses_degree=ulysses,
            context_parallel_load_balancer=balancer,
        )  # fmt: skip
        meshes = ParallelDims.from_config(parallelism, world_size).build_meshes("cpu")
        cp = ContextParallel(meshes.cp, parallelism, "auto", packed, torch.device("cpu"))
        cp.validate(SEQ, inputs["k"].shape[2], inputs["q"].shape[2])
        positions = packed_positions(DOC_LENGTHS if packed else WHOLE_WINDOWS)
        _, _, _, context = cp.shard(positions, positions, positions)
        q, k, v = (cp.shard_sequence(inputs[n], context).requires_grad_() for n in ("q", "k", "v"))
        out = cp.attention(q, k, v, context)
        out.backward(cp.shard_sequence(inputs["dout"], context))
        results[name] = {
            "out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "ulysses_group": dist.get_process_group_ranks(cp.ulysses_group),
            "ring_group": dist.get_process_group_ranks(cp.group) if cp.group is not None else [rank],
            "attention": (cp.algorithm, cp.layout, cp.ring),
            "describe": cp.describe(),
            "shard": cp.shard_sequence(positions.new_tensor(range(SEQ)).expand(2, -1), context),
        }
    return results


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(_case_run, CP, make_inputs(seed=3), timeout=300)


@pytest.fixture(scope="module")
def references() -> dict:
    inputs = make_inputs(seed=3)
    return {False: per_document_reference(inputs, WHOLE_WINDOWS), True: per_document_reference(inputs)}


@pytest.mark.parametrize("name, ulysses, packed, balancer", CASES, ids=[c[0] for c in CASES])
def test_attention_equals_full_attention(runs, references, name, ulysses, packed, balancer):
    reference = references[packed]
    covered = torch.zeros(2, SEQ, dtype=torch.int64)
    for rank, result in enumerate(runs):
        mine = result[name]
        # Token indices this rank holds, per sample (packed layouts differ between samples): the
        # reference rows to compare with.
        rows = mine["shard"]
        covered.scatter_add_(1, rows, torch.ones_like(rows))
        for key in ("out", "dq", "dk", "dv"):
            expected = torch.stack([reference[key][b, rows[b]] for b in range(len(rows))])
            error = (mine[key] - expected).abs().max().item()
            assert error <= ATOL, f"{name} rank {rank}: {key} differs from full attention by {error:.2e}"
    assert covered.eq(1).all(), f"{name}: the shards do not cover each token once"


def test_groups_and_algorithms(runs):
    """Ulysses groups are adjacent ranks; the ring links ranks one Ulysses group apart."""
    expected = {
        "ulysses4": ([0, 1, 2, 3], ("local", "contiguous", 1)),
        "ulysses4_packed": ([0, 1, 2, 3], ("varlen_llama3", "contiguous", 1)),
        "hybrid2x2_zigzag": ([0, 1], ("batch_ring", "zigzag", 2)),
        "hybrid2x2_contiguous": ([0, 1], ("batch_ring", "contiguous", 2)),
        "hybrid2x2_packed": ([0, 1], ("varlen_llama3", "zigzag", 2)),
    }
    for name, (group0, attention) in expected.items():
        assert runs[0][name]["ulysses_group"] == group0, name
        assert runs[0][name]["attention"] == attention, name
    # The startup line says whether KV heads were replicated (2 KV heads: yes over 4 ranks).
    pure = runs[0]["ulysses4"]["describe"]
    assert pure.startswith("ulysses 4 + local (contiguous, sdpa_cpu); ulysses 4 > 2 KV heads"), pure
    assert "replicated 2x" in runs[0]["ulysses4"]["describe"]
    hybrid = runs[0]["hybrid2x2_zigzag"]["describe"]
    assert hybrid.startswith("ulysses 2 + batch_ring (zigzag, sdpa_cpu) over 2 ring ranks;"), hybrid
    assert "not repeated" in hybrid
    assert runs[3]["hybrid2x2_zigzag"]["ulysses_group"] == [2, 3]
    assert runs[1]["hybrid2x2_zigzag"]["ring_group"] == [1, 3]


def test_kv_heads_are_replicated_only_when_needed():
    assert [kv_copies(u, 8) for u in (1, 2, 4, 8)] == [1, 1, 1, 1]
    assert [kv_copies(u, 8) for u in (16, 32)] == [2, 4]
    # 8 query heads over 4 ranks: the 2 KV heads go out twice each, one per rank.
    assert "replicated 2x" in validate_ulysses(4, 8, 2)
    assert "not repeated" in validate_ulysses(2, 8, 2)
    for u, n_heads, n_kv in [(4, 8, 2), (16, 32, 8), (6, 12, 4), (3, 6, 2)]:
        copies = kv_copies(u, n_kv)
        # Every rank's block of query heads maps onto its own block of the replicated KV heads.
        group = n_heads // (n_kv * copies)
        for rank in range(u):
            q_heads = range(rank * n_heads // u, (rank + 1) * n_heads // u)
            kv_block = range(rank * n_kv * copies // u, (rank + 1) * n_kv * copies // u)
            assert {h // group for h in q_heads} <= set(kv_block), (u, n_heads, n_kv, rank)


def _degrees(cp: int, ulysses: int) -> dict:
    return dict(context_parallel_degree=cp, context_parallel_ulysses_degree=ulysses)


@pytest.mark.parametrize(
    "kw, world, per_node, words",
    [
        (_degrees(4, 3), 4, None, ["ulysses_degree 3", "divide", "context_parallel_degree 4"]),
        (_degrees(4, 4), 4, 2, ["ulysses_degree 4", "nodes of 2 processes"]),
    ],
    ids=["not-dividing-cp", "larger-than-a-node"],
)
def test_bad_ulysses_degrees_get_one_line(kw, world, per_node, words):
    with pytest.raises(UserError) as info:
        ParallelDims.from_config(Parallelism(**kw), world, per_node)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_ulysses_must_divide_the_query_heads():
    with pytest.raises(UserError, match="ulysses_degree = 4 must divide the model's 6 query heads"):
        validate_ulysses(4, 6, 2)
