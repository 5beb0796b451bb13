"""End to end through scripts/run_train.sh at dp2 x cp2 on CPU: resume is exact, preemption is clean.

The reference for a resumed run is the same run without interruption: with deterministic
algorithms, the losses, gradient norms and learning rates after the resume must be bit-identical.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.train_utils import REPO, TINY, read_metrics, run_train

DP2_CP2 = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.context_parallel_degree", "2"]
SIX_STEPS = ["--training.steps", "6", "--checkpoint.enable", "true", "--checkpoint.interval", "3"]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _complete_steps(dump_folder: Path) -> list[int]:
    folder = dump_folder / "checkpoint"
    return sorted(
        int(p.name.split("-")[1]) for p in folder.glob("step-*") if "." not in p.name and (p / ".metadata").is_file()
    )


def test_resume_after_step_3_matches_the_straight_run_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    _ok(run_train(straight, *TINY, *DP2_CP2, *SIX_STEPS, ngpu=4))
    assert _complete_steps(straight) == [3, 6]

    # A run stopped after step 3 has exactly this on disk: the step-3 checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    _ok(run_train(resumed, *TINY, *DP2_CP2, *SIX_STEPS, ngpu=4))

    expected = {record["step"]: record for record in read_metrics(straight)}
    records = read_metrics(resumed)
    assert [record["step"] for record in records] == [4, 5, 6], "the second run did not resume at step 3"
    for record in records:
        for key in ("loss", "grad_norm", "lr", "ntokens_seen"):
            assert record[key] == expected[record["step"]][key], (record["step"], key, record, expected[record["step"]])


def _worker_pids(dump_folder: Path) -> list[int]:
    """Live trainer processes (not the launcher) of the run writing to `dump_folder`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"titan_cp.train" in cmdline and str(dump_folder).encode() in cmdline and b"torch.distributed.run" not in cmdline:
            pids.append(int(pid))
    return pids


def test_sigterm_to_the_launcher_saves_a_checkpoint_and_exits_0(tmp_path):
    env = {**os.environ, "NGPU": "4", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        ["bash", "scripts/run_train.sh", "train_configs/debug_model.toml", "--job.dump_folder", str(tmp_path),
         *TINY, *DP2_CP2, "--training.steps", "100000",
         "--checkpoint.enable", "true", "--checkpoint.interval", "100000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert launcher.poll() is None, launcher.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
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
    assert not _worker_pids(tmp_path), "trainer processes outlived the launcher"
