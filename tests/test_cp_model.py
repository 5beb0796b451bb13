"""Context parallelism gives the same model math as no context parallelism (invariant 1 in docs/architecture.md).

A tiny Llama is built and stepped as `Trainer` does (tests/cp_model_utils.py) on cp = 2, 3 and 4
gloo ranks (FSDP over the same ranks), and compared with one process without cp or FSDP:
- plain causal windows, batch ring in the zigzag and contiguous layouts: same weights after
  init, same summed loss, same gradient for every parameter (1e-5 relative);
- packed documents, all-gather K/V varlen attention (zigzag within documents, and contiguous):
  the same against cp = 1 with packing, and
  cp = 1 with packing differs from causal attention over the whole window (masks are active);
- Hugging Face weights loaded into a cp = 2 model give transformers' logits after unsharding.
Negative controls (positions sharded in the wrong layout, logits unsharded in the wrong layout)
show that each comparison can fail. Spawning processes is the slow part, so one spawned run per
world size covers all its cases.
"""

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests import cp_model_utils as cpm
from tests.dist_utils import run_distributed
from tests.hf_utils import save_random_llama
from titan_cp.checkpoint.hf import load_hf_args, load_hf_model, load_hf_weights
from titan_cp.context_parallel import ContextParallel
from titan_cp.context_parallel.sharding import shard, unshard
from titan_cp.parallel import ParallelDims

CPU = torch.device("cpu")
RTOL = 1e-5

ZIGZAG = cpm.Case("zigzag")
CONTIGUOUS = cpm.Case("contiguous", load_balancer="none")
PACKED = cpm.Case("packed", sample_packing=True)
PACKED_CONTIGUOUS = cpm.Case("packed_contiguous", load_balancer="none", sample_packing=True)
WRONG_POSITIONS = cpm.Case("zigzag_positions_sharded_contiguous", wrong_position_layout=True)
PLAIN_ON_PACKED = cpm.Case("causal_over_packed_window")  # cp = 1 only: packed data, no document mask

# Cases per world size (= cp degree, FSDP over the same ranks).
WORLD_CASES = {
    2: [ZIGZAG, CONTIGUOUS, PACKED, PACKED_CONTIGUOUS, WRONG_POSITIONS],
    3: [PACKED],
    4: [ZIGZAG, PACKED],
}
EXPECTED_ATTENTION = {  # (ContextParallel.algorithm, layout) each case must select
    "zigzag": ("batch_ring", "zigzag"),
    "contiguous": ("batch_ring", "contiguous"),
    "packed": ("varlen_llama3", "zigzag"),
    "packed_contiguous": ("varlen_llama3", "contiguous"),
    "zigzag_positions_sharded_contiguous": ("batch_ring", "zigzag"),
}
HF_LAYOUTS = ("zigzag", "none")  # parallelism.context_parallel_load_balancer values


@contextmanager
def deterministic():
    """Deterministic kernels for the duration, restoring the caller's setting (pytest shares it)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _batch(case: cpm.Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpm.packed_batch() if case.sample_packing or case is PLAIN_ON_PACKED else cpm.plain_batch()


def _cp_steps(rank: int, dims: ParallelDims, meshes, cases: list[cpm.Case]) -> dict:
    """One trainer-style forward/backward per case on this cp mesh."""
    results = {}
    for case in cases:
        parallelism = case.parallelism(dims.cp)
        cp = ContextParallel(meshes.cp, parallelism, "auto", case.sample_packing, CPU)
        cp.validate(cpm.SEQ_LEN, cpm.TINY_ARGS.n_kv_heads)
        model = cpm.build_model(cp, dims, meshes.fsdp, case)
        cpm.sharpen_attention(model)
        tokens, labels, positions, context = cp.shard(*_batch(case))
        if case.wrong_position_layout:
            other = "contiguous" if cp.layout == "zigzag" else "zigzag"
            positions = shard(_batch(case)[2], cp.rank, cp.cp, other)
        loss = cpm.forward_backward(model, case, (tokens, labels, positions, context))
        params, grads = cpm.full_params(model), cpm.full_grads(model)
        results[case.name] = {
            "attention": (cp.algorithm, cp.layout),
            "loss": loss,
            # Full tensors are identical on every rank (all-gathered); rank 0 sends them back.
            "params": params if rank == 0 else None,
            "grads": grads if rank == 0 else None,
        }
    return results


def _hf_logits(dims: ParallelDims, meshes, folder: str, tokens: torch.Tensor) -> dict:
    """Per layout: full logits of a Hugging Face checkpoint run under cp (and unsharded wrongly)."""
    args = load_hf_args(folder)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    results = {}
    for load_balancer in HF_LAYOUTS:
        case = cpm.Case(f"hf_{load_balancer}", load_balancer=load_balancer)
        cp = ContextParallel(meshes.cp, case.parallelism(dims.cp), "auto", False, CPU)
        model = cpm.build_model(cp, dims, meshes.fsdp, case, args)
        load_hf_weights(model, folder)
        local_tokens, _, local_positions, context = cp.shard(tokens, torch.zeros_like(tokens), positions)
        with torch.no_grad():
            local_logits = model(local_tokens, local_positions, context)
        gathered = [torch.empty_like(local_logits) for _ in range(cp.cp)]
        dist.all_gather(gathered, local_logits, group=cp.group)
        wrong = "contiguous" if cp.layout == "zigzag" else "zigzag"
        results[cp.layout] = {"logits": unshard(gathered, cp.layout), "wrong_unshard": unshard(gathered, wrong)}
    return results


def _world_run(rank: int, world_size: int, cases: list[cpm.Case], hf_job: tuple[str, torch.Tensor] | None) -> dict:
    """Worker: cp = world_size (FSDP over the same ranks), meshes built once as the trainer does."""
    torch.use_deterministic_algorithms(True)
    dims = ParallelDims.from_config(cases[0].parallelism(world_size), world_size)
    meshes = dims.build_meshes("cpu")
    results = {"steps": _cp_steps(rank, dims, meshes, cases)}
    if hf_job is not None:
        results["hf"] = _hf_logits(dims, meshes, *hf_job)
    return results


def _reference(case: cpm.Case) -> dict:
    """cp = 1 without FSDP, in this process: the trainer's single-process path."""
    parallelism = case.parallelism(1)
    cp = ContextParallel(None, parallelism, "auto", case.sample_packing, CPU)
    with deterministic():
        model = cpm.build_model(cp, ParallelDims.from_config(parallelism, 1), None, case)
        cpm.sharpen_attention(model)
        loss = cpm.forward_backward(model, case, cp.shard(*_batch(case)))
    return {
        "attention": (cp.algorithm, cp.layout),
        "loss": loss,
        "params": cpm.full_params(model),
        "grads": cpm.full_grads(model),
    }


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _assert_same_math(result: dict, reference: dict, where: str) -> None:
    assert result["params"].keys() == reference["params"].keys(), where
    for name, expected in reference["params"].items():
        # Same seed, same initial weights: FSDP's sharded init must equal the unsharded one.
        assert torch.equal(result["params"][name], expected), f"{where}: initial {name} differs from cp=1"
    assert abs(result["loss"] - reference["loss"]) <= RTOL * abs(reference["loss"]), (
        f"{where}: summed loss {result['loss']} vs cp=1 {reference['loss']}"
    )
    for name, expected in reference["grads"].items():
        error = _relative_error(result["grads"][name], expected)
        assert error <= RTOL, f"{where}: grad of {name} differs from cp=1 by {error:.2e} relative"


def _assert_clearly_different(result: dict, reference: dict, where: str) -> None:
    """Far outside the tolerance: the equality checks above would have failed on this result."""
    loss_error = abs(result["loss"] - reference["loss"]) / abs(reference["loss"])
    assert loss_error > 10 * RTOL, f"{where}: summed loss only {loss_error:.2e} relative from the reference"
    for layer in range(cpm.TINY_ARGS.n_layers):
        for weight in ("wq", "wk", "wv"):
            name = f"layers.{layer}.attention.{weight}.weight"
            error = _relative_error(result["grads"][name], reference["grads"][name])
            assert error > 1e-2, f"{where}: grad of {name} only {error:.2e} relative from the reference"


def _save_hf_model(folder: Path) -> torch.nn.Module:
    # Attention weights large enough that attention is peaked, so a wrong position or lost block shows.
    return save_random_llama(
        folder, vocab_size=cpm.TINY_ARGS.vocab_size, hidden_size=64, intermediate_size=96,
        num_attention_heads=8, rope_theta=10000.0, initializer_range=0.15,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model = _save_hf_model(folder)
    tokens = cpm.plain_batch()[0]
    with torch.no_grad():
        logits = model(tokens).logits
        titan_logits = load_hf_model(folder)(tokens)
    return {"folder": str(folder), "tokens": tokens, "transformers": logits, "titan_cp_cp1": titan_logits}


@pytest.fixture(scope="module")
def references() -> dict:
    refs = {case.name: _reference(case) for case in (ZIGZAG, PACKED, PLAIN_ON_PACKED)}
    assert refs["zigzag"]["attention"] == ("local", "contiguous")
    assert refs["packed"]["attention"] == ("varlen_llama3", "contiguous")
    assert refs["causal_over_packed_window"]["attention"] == ("local", "contiguous")
    return refs


@pytest.fixture(scope="module")
def cp_runs(hf_reference) -> dict:
    """{world size: {"steps": rank 0's results per case, "hf": every rank's HF logits}}."""
    runs = {}
    for world_size, cases in WORLD_CASES.items():
        hf_job = (hf_reference["folder"], hf_reference["tokens"]) if world_size == 2 else None
        per_rank = run_distributed(_world_run, world_size, cases, hf_job, timeout=300)
        for name, result in per_rank[0]["steps"].items():
            losses = {r["steps"][name]["loss"] for r in per_rank}
            assert len(losses) == 1, f"cp={world_size} {name}: ranks disagree on the all-reduced loss {losses}"
            assert result["attention"] == EXPECTED_ATTENTION[name], (world_size, name, result["attention"])
        runs[world_size] = {"steps": per_rank[0]["steps"], "hf": [r.get("hf") for r in per_rank]}
    return runs


@pytest.mark.parametrize(
    "world_size, name",
    [(2, "zigzag"), (2, "contiguous"), (4, "zigzag")],
    ids=["cp2-zigzag", "cp2-contiguous", "cp4-zigzag"],
)
def test_batch_ring_gradients_equal_cp1(cp_runs, references, world_size, name):
    _assert_same_math(cp_runs[world_size]["steps"][name], references["zigzag"], f"cp={world_size} {name}")


def test_positions_in_the_wrong_layout_change_the_gradients(cp_runs, references):
    """Negative control: a layout mistake in the positions alone is caught by the comparison."""
    wrong = cp_runs[2]["steps"]["zigzag_positions_sharded_contiguous"]
    _assert_clearly_different(wrong, references["zigzag"], "positions sharded in the wrong layout")


@pytest.mark.parametrize(
    "world_size, name",
    [(2, "packed"), (3, "packed"), (4, "packed"), (2, "packed_contiguous")],
    ids=["cp2-zigzag", "cp3-zigzag", "cp4-zigzag", "cp2-contiguous"],
)
def test_packed_documents_gradients_equal_cp1(cp_runs, references, world_size, name):
    _assert_same_math(cp_runs[world_size]["steps"][name], references["packed"], f"cp={world_size} {name}")


def test_packed_reference_masks_documents(references):
    """cp = 1 with packing is not causal attention over the whole window: documents are masked."""
    _assert_clearly_different(
        references["packed"], references["causal_over_packed_window"], "packed vs whole-window causal"
    )


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_hf_weights_under_cp_give_transformers_logits(cp_runs, hf_reference, layout):
    """Relative to the largest logit: titan_cp and transformers round fp32 differently even at cp = 1."""
    for rank, hf in enumerate(cp_runs[2]["hf"]):
        logits = hf[layout]["logits"]
        for reference in ("transformers", "titan_cp_cp1"):
            error = _relative_error(logits, hf_reference[reference])
            assert error <= RTOL, f"rank {rank} {layout}: logits {error:.2e} relative from {reference}"
        # Negative control: the same shards put back in the other layout are not the logits.
        error = _relative_error(hf[layout]["wrong_unshard"], hf_reference["transformers"])
        assert error > 1e-2, f"rank {rank} {layout}: wrongly unsharded logits only {error:.2e} relative off"
