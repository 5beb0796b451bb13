"""One model, many layouts: the per-step losses of the real launcher match one process.

Same math with and without parallelism, at the level a user sees it: `./scripts/run_train.sh`
with FSDP, HSDP, context parallelism (both layouts) and their mix, for the same seed and global
batch, gives the losses and gradient norms of a single process within 1e-4 relative over 8 steps.
"""

import pytest

from tests.train_utils import assert_close_curves, train_curves

STEPS = ["--training.steps", "8", "--training.local_batch_size", "1", "--training.global_batch_size", "4"]


@pytest.fixture(scope="module")
def single_process_curves(tmp_path_factory) -> dict[str, list[float]]:
    curves = train_curves(tmp_path_factory.mktemp("single"), *STEPS)
    assert len(curves["loss"]) == 8 and curves["loss"][-1] < curves["loss"][0]
    return curves


LAYOUTS = {
    "fsdp2": (2, []),
    "fsdp4": (4, ["--parallelism.data_parallel_shard_degree", "4"]),
    "hsdp2x2": (4, ["--parallelism.data_parallel_replicate_degree", "2"]),
    "cp2_zigzag": (2, ["--parallelism.context_parallel_degree", "2"]),
    "cp2_contiguous": (2, ["--parallelism.context_parallel_degree", "2", "--parallelism.context_parallel_load_balancer", "none"]),
    "cp4": (4, ["--parallelism.context_parallel_degree", "4"]),
    "dp2_cp2": (4, ["--parallelism.context_parallel_degree", "2"]),
    # The 8-GPU layouts (cp=8; dp2 x cp4) at CPU scale, until an 8-GPU machine runs them.
    "cp8": (8, ["--parallelism.context_parallel_degree", "8"]),
    "dp2_cp4": (8, ["--parallelism.context_parallel_degree", "4"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout, single_process_curves, tmp_path):
    ngpu, overrides = LAYOUTS[layout]
    curves = train_curves(tmp_path, *STEPS, *overrides, ngpu=ngpu)
    assert_close_curves(curves, single_process_curves, rtol=1e-4)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_the_losses(mode, single_process_curves, tmp_path):
    curves = train_curves(tmp_path, *STEPS, "--activation_checkpoint.mode", mode)
    assert_close_curves(curves, single_process_curves, rtol=1e-5)


def test_compile_keeps_the_losses(single_process_curves, tmp_path):
    curves = train_curves(tmp_path, *STEPS, "--compile.enable", "true")
    assert_close_curves(curves, single_process_curves, rtol=1e-4)


PACKED = ["--training.steps", "6", "--training.local_batch_size", "1", "--training.global_batch_size", "4",
          "--training.seq_len", "96", "--training.sample_packing", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def packed_single_process_curves(tmp_path_factory) -> dict[str, list[float]]:
    return train_curves(tmp_path_factory.mktemp("packed_single"), *PACKED)


@pytest.mark.parametrize("cp", [2, 3])
def test_packed_documents_match_single_process(cp, packed_single_process_curves, tmp_path):
    """Packed documents (varlen_llama3, contiguous shards; 96 tokens split 2 or 3 ways, so
    documents cross shard edges) give the single-process losses and gradient norms."""
    curves = train_curves(tmp_path, *PACKED, "--parallelism.context_parallel_degree", str(cp), ngpu=cp)
    assert_close_curves(curves, packed_single_process_curves, rtol=1e-4)
