"""End to end through scripts/run_train.sh at dp2 x cp2 on CPU: resume is exact, preemption is clean.

The reference for a resumed run is the same run without interruption: with deterministic
algorithms, the losses, gradient norms and learning rates after the resume must be bit-identical.
"""

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.train_utils import TINY, assert_close_losses, read_metrics, run_train, start_training, trainer_ranks

DP2_CP2 = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.context_parallel_degree", "2"]
SIX_STEPS = ["--training.steps", "6", "--checkpoint.enable", "true", "--checkpoint.interval", "3"]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _complete_steps(dump_folder: Path) -> list[int]:
    folder = dump_folder / "checkpoint"
    return sorted(
        int(p.name.split("-")[1]) for p in folder.glob("step-*") if "." not in p.name and (p / ".metadata").is_file()
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Six steps at dp2 x cp2 without interruption, with checkpoints at steps 3 and 6."""
    folder = tmp_path_factory.mktemp("straight")
    _ok(run_train(folder, *TINY, *DP2_CP2, *SIX_STEPS, ngpu=4))
    assert _complete_steps(folder) == [3, 6]
    return folder


def _resume_from_step_3(straight: Path, resumed: Path, *layout: str) -> list[dict]:
    """What a run stopped after step 3 has on disk (the step-3 checkpoint), resumed in `layout`."""
    shutil.copytree(straight / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    _ok(run_train(resumed, *TINY, *layout, *SIX_STEPS, ngpu=4))
    return read_metrics(resumed)


def test_resume_after_step_3_matches_the_straight_run_bit_for_bit(straight, tmp_path):
    records = _resume_from_step_3(straight, tmp_path / "resumed", *DP2_CP2)
    expected = {record["step"]: record for record in read_metrics(straight)}
    assert [record["step"] for record in records] == [4, 5, 6], "the second run did not resume at step 3"
    for record in records:
        for key in ("loss", "grad_norm", "lr", "ntokens_seen"):
            assert record[key] == expected[record["step"]][key], (record["step"], key, record, expected[record["step"]])


def test_resume_on_another_mesh_continues_the_run(straight, tmp_path):
    """A checkpoint sharded by FSDP over 4 ranks resumes on an HSDP mesh (replicated twice,
    sharded over 2: the layout multi-node runs get from parallelism.fsdp_shard_within_node), with
    the same data order; the losses continue the straight run's (fp32, within 1e-5: the
    reductions run in another order)."""
    records = _resume_from_step_3(
        straight, tmp_path / "hsdp", "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.context_parallel_degree", "2",
    )  # fmt: skip
    expected = [record["loss"] for record in read_metrics(straight) if record["step"] > 3]
    assert [record["step"] for record in records] == [4, 5, 6]
    assert_close_losses([record["loss"] for record in records], expected, rtol=1e-5)


def test_sigterm_to_the_launcher_saves_a_checkpoint_and_exits_0(tmp_path):
    launcher = start_training(
        tmp_path, *TINY, *DP2_CP2, "--training.steps", "100000",
        "--checkpoint.enable", "true", "--checkpoint.interval", "100000", ngpu=4,
    )  # fmt: skip
    try:
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert "SIGTERM received" in output, output[-3000:]
    last_logged = read_metrics(tmp_path)[-1]["step"]
    assert _complete_steps(tmp_path) == [last_logged], output[-3000:]
    assert not [p for p in (tmp_path / "checkpoint").iterdir() if ".tmp-" in p.name]
    assert not trainer_ranks(tmp_path), "trainer processes outlived the launcher"
