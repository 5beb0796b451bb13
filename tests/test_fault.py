"""A rank that dies mid-run ends the whole job quickly, with a message, instead of a hang."""

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.train_utils import REPO, TINY


def _training_ranks(dump_folder: Path) -> dict[int, int]:
    """RANK -> pid of every live trainer process of the run writing to `dump_folder`."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"titan_cp.train" not in cmdline or str(dump_folder).encode() not in cmdline:
            continue
        if b"torch.distributed.run" in cmdline:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = int(pid)
    return ranks


def test_killing_one_rank_ends_all_of_them(tmp_path):
    env = {**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        ["bash", "scripts/run_train.sh", "train_configs/debug_model.toml", "--job.dump_folder", str(tmp_path),
         *TINY, "--training.steps", "100000", "--comm.train_timeout_seconds", "20"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert launcher.poll() is None, launcher.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        ranks = _training_ranks(tmp_path)
        assert set(ranks) >= {0, 1}, ranks
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=90)
        assert time.monotonic() - killed_at < 90
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "Signal 9" in output or "SIGKILL" in output, output[-2000:]
    assert not _training_ranks(tmp_path)
