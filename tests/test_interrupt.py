"""Ctrl-C at the terminal: SIGINT to the whole foreground process group of scripts/run_train.sh.

The first Ctrl-C saves a checkpoint at the end of the current step, prints one line and ends
every process, the launcher with exit code 130; a second Ctrl-C ends them at once, unsaved.
Neither prints a traceback or leaves a trainer process behind.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train_utils import REPO, TINY, read_metrics, start_training, trainer_ranks


@pytest.fixture(autouse=True)
def sigint_not_ignored():
    """A terminal's job starts with Ctrl-C at its default action. A pytest started as a background
    job of a non-interactive shell inherits SIGINT ignored, its children too, and bash cannot trap
    a signal ignored at its start; a Python handler here is reset to the default in the launcher."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

CHECKPOINTING = ["--checkpoint.enable", "true", "--checkpoint.interval", "100000"]


def _complete_steps(dump_folder: Path) -> list[int]:
    folder = dump_folder / "checkpoint"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.iterdir() if "." not in p.name and (p / ".metadata").is_file())


def _ctrl_c(launcher: subprocess.Popen) -> None:
    """What the terminal does: SIGINT to every process of the launcher's process group."""
    os.killpg(launcher.pid, signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    launcher = start_training(tmp_path, *TINY, "--training.steps", "100000", *CHECKPOINTING, ngpu=2)
    try:
        _ctrl_c(launcher)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "Ctrl-C" in line]
    assert len(lines) == 1 and "saving a checkpoint" in lines[0], output[-3000:]
    last_logged = read_metrics(tmp_path)[-1]["step"]
    assert _complete_steps(tmp_path) == [last_logged], output[-3000:]
    assert not trainer_ranks(tmp_path), "trainer processes outlived the launcher"


def test_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    """Both Ctrl-Cs arrive while the model is still being built: the first alone would train one
    step and save it; the second ends every process before that."""
    launcher = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "run_train.sh"), "train_configs/debug_model.toml",
         "--job.dump_folder", str(tmp_path), *TINY, "--training.steps", "100000", *CHECKPOINTING],
        cwd=REPO, env={**os.environ, "NGPU": "2", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        seen = []
        for line in launcher.stdout:  # the trainer has installed its handlers once it prints
            seen.append(line)
            if "memory estimate" in line:
                break
        _ctrl_c(launcher)
        time.sleep(0.3)
        _ctrl_c(launcher)
        stopped_at = time.monotonic()
        output, _ = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - stopped_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = "".join(seen) + output
    assert launcher.returncode == 130, output[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f} s after the second Ctrl-C"
    assert "Traceback" not in output, output[-3000:]
    assert "second Ctrl-C" in output, output[-3000:]
    assert _complete_steps(tmp_path) == [], output[-3000:]
    assert not trainer_ranks(tmp_path), "trainer processes outlived the launcher"
