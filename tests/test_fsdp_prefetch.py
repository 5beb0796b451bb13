"""parallelism.fsdp_prefetch: the all-gathers move earlier, the math stays the same.

The order test watches FSDP2 through public hooks only: each block's all-gathers go through a
recording all-gather (`FSDPModule.set_custom_all_gather`), and module hooks mark when each block's
forward and backward compute starts. The expected order is derived from the depth alone, so a
depth that is ignored, or off by one, fails.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from tests.cp_model_utils import TINY_ARGS
from tests.dist_utils import run_distributed
from tests.train_utils import assert_close_losses, train_losses
from titan_cp.config import load_config
from titan_cp.config.schema import ActivationCheckpoint, Compile, Parallelism, Training
from titan_cp.errors import UserError
from titan_cp.models.llama3 import Transformer
from titan_cp.parallel import ParallelDims, parallelize_llama

ARGS = dataclasses.replace(TINY_ARGS, n_layers=4)
DEPTHS = (0, 1, 2)
# Data-parallel replicas over 4 ranks: 1 is a 1-D FSDP mesh of 4, 2 a 2-D HSDP mesh of 2 x 2.
MESHES = {"fsdp": 1, "hsdp": 2}
STEPS = 2


class RecordingAllGather:
    """One block's all-gather, logging the block's index before gathering.

    `set_custom_all_gather` takes an object with torch's `AllGather` interface (`allocate` and
    `__call__`); the base class is not exported publicly, so this one stands alone. If torch
    changes the interface, the runs below fail or the log stays empty, which the test asserts.
    """

    def __init__(self, index: int, log: list) -> None:
        self.index, self.log = index, log

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        self.log.append(("gather", self.index))
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def build(replicate: int, world_size: int, depth: int, log: list) -> Transformer:
    """The model as the trainer parallelizes it (config -> mesh -> `parallelize_llama`), plus recorders."""
    parallelism = Parallelism(data_parallel_replicate_degree=replicate, fsdp_prefetch=depth)
    dims = ParallelDims.from_config(parallelism, world_size)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ARGS)
    parallelize_llama(
        model, dims, dims.build_meshes("cpu").fsdp, torch.device("cpu"), Training(), parallelism,
        ActivationCheckpoint(), Compile(),
    )  # fmt: skip
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    for index, block in enumerate(model.layers.values()):
        block.set_custom_all_gather(RecordingAllGather(index, log))
        # Markers inside the block: they fire after FSDP's own pre-forward / pre-backward hooks
        # on the block, i.e. once its all-gather and the prefetches it issues are done.
        block.attention_norm.register_forward_pre_hook(lambda *_, i=index: log.append(("forward", i)))
        block.feed_forward.register_full_backward_pre_hook(lambda *_, i=index: log.append(("backward", i)))
    return model


def _prefetch_worker(rank: int, world_size: int) -> dict:
    """Per (mesh, depth): each step's event log and the global losses of a few SGD steps."""
    g = torch.Generator().manual_seed(100 + rank)  # each data-parallel rank its own batch
    batches = [torch.randint(0, ARGS.vocab_size, (2, 17), generator=g) for _ in range(STEPS)]
    out = {}
    for mesh_name, replicate in MESHES.items():
        for depth in DEPTHS:
            log: list = []
            model = build(replicate, world_size, depth, log)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            logs, losses = [], []
            for window in batches:
                log.clear()
                loss = model(window[:, :-1], labels=window[:, 1:], loss_chunk_size=8)
                (loss / window[:, 1:].numel()).backward()
                optimizer.step()
                optimizer.zero_grad()
                logs.append(list(log))
                total = loss.detach()
                dist.all_reduce(total)
                losses.append(total.item())
            out[mesh_name, depth] = (logs, losses)
    return out


@pytest.fixture(scope="module")
def prefetch_runs() -> list[dict]:
    return run_distributed(_prefetch_worker, 4)


def expected_gathered(event: str, block: int, depth: int, n_layers: int) -> set[int]:
    """Blocks gathered in this pass before `block`'s compute starts.

    Forward: the block itself and the next `depth`. Backward: blocks resharded after forward
    (all but the last, with the default reshard policy) from `block` - max(depth, 1) upwards;
    FSDP2's own backward prefetch is one block, which depth 0 and 1 both give.
    """
    if event == "forward":
        return set(range(min(block + 1 + depth, n_layers)))
    return {j for j in range(n_layers - 1) if j >= block - max(depth, 1)}


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_blocks_gather_depth_blocks_ahead(prefetch_runs, mesh_name, depth):
    n_layers = ARGS.n_layers
    for rank, runs in enumerate(prefetch_runs):
        logs, _ = runs[mesh_name, depth]
        for step, log in enumerate(logs, start=1):
            markers = [e for e in log if e[0] != "gather"]
            # Each block once per pass, nearest first (forward 0, 1, ...; backward L-2, L-3, ...); an
            # empty log (a recorder torch stopped calling) fails here rather than passing vacuously.
            gathers = [block for kind, block in log if kind == "gather"]
            assert gathers == list(range(n_layers)) + list(reversed(range(n_layers - 1))), log
            assert markers == [("forward", i) for i in range(n_layers)] + [
                ("backward", i) for i in reversed(range(n_layers))
            ], log
            gathered: set[int] = set()
            for kind, block in log:
                if kind == "gather":
                    gathered.add(block)
                    continue
                expected = expected_gathered(kind, block, depth, n_layers)
                assert gathered == expected, (
                    f"rank {rank} step {step} {mesh_name} depth {depth}: before {kind} of block {block}"
                    f" gathered {sorted(gathered)}, expected {sorted(expected)}\n{log}"
                )
                if (kind, block) == ("forward", n_layers - 1):
                    gathered = set()  # every later all-gather belongs to backward


@pytest.mark.parametrize("mesh_name", MESHES)
def test_prefetch_keeps_the_losses_in_process(prefetch_runs, mesh_name):
    reference = prefetch_runs[0][mesh_name, 0][1]
    for depth in DEPTHS[1:]:
        assert_close_losses(prefetch_runs[0][mesh_name, depth][1], reference, rtol=1e-5)
    assert reference[-1] != reference[0]  # the optimizer moved, so step 2 depends on step 1


TRAIN = ["--training.steps", "4", "--training.local_batch_size", "1", "--training.global_batch_size", "4"]


def test_prefetch_keeps_the_trainer_losses(tmp_path):
    """FSDP over 2 ranks through the launcher, with gradient accumulation (2 micro-batches a step)."""
    implicit = train_losses(tmp_path / "p0", *TRAIN, "--parallelism.fsdp_prefetch", "0", ngpu=2)
    explicit = train_losses(tmp_path / "p2", *TRAIN, "--parallelism.fsdp_prefetch", "2", ngpu=2)
    assert len(implicit) == 4
    assert_close_losses(explicit, implicit, rtol=1e-5)


def test_negative_prefetch_is_one_line_error():
    with pytest.raises(UserError) as info:
        load_config(["--parallelism.fsdp_prefetch", "-1"])
    message = str(info.value)
    assert "\n" not in message
    assert "parallelism.fsdp_prefetch" in message and ">= 0" in message and "-1" in message


def test_prefetch_defaults_to_fsdp2_behaviour():
    assert load_config([]).parallelism.fsdp_prefetch == 0
    assert load_config(["--parallelism.fsdp_prefetch", "3"]).parallelism.fsdp_prefetch == 3
