"""Mistakes found before anything is built, and a mistake on some ranks only, end the job at once.

The output folder (job.dump_folder) is checked before the model is built; a mistake raised on one
rank alone ends every rank within seconds (not after the 300 s collective timeout), with its
one line and no traceback. An unexpected error on a rank whose output is hidden still shows its
traceback, in torchrun's failure report.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.train_utils import REPO, TINY, trainer_ranks
from titan_cp.errors import UserError
from titan_cp.output_folder import output_folder_error
from titan_cp.parallel import pick_device


def test_output_folder_is_created_when_missing(tmp_path):
    folder = tmp_path / "a" / "b"
    assert output_folder_error(str(folder)) is None
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_unusable_output_folders_are_named(tmp_path):
    file = tmp_path / "file"
    file.write_text("data")
    assert "empty" in output_folder_error("")
    assert "is a file" in output_folder_error(str(file))
    below = output_folder_error(str(file / "run"))
    assert f"because {file} is a file" in below
    assert file.read_text() == "data"


def _launch(dump_folder: str, *overrides: str, ngpu: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/run_train.sh", "train_configs/debug_model.toml", *TINY, *overrides,
         f"--job.dump_folder={dump_folder}"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "NGPU": str(ngpu), "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_unwritable_output_folder_stops_before_the_model_is_built(tmp_path):
    file = tmp_path / "results"
    file.write_text("")
    result = subprocess.run(  # the trainer without torchrun: the same check, faster
        [sys.executable, "-m", "titan_cp.train", "--job.config_file", "train_configs/debug_model.toml",
         f"--job.dump_folder={file / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "job.dump_folder" in errors[0] and str(file) in errors[0], result.stderr[-2000:]
    assert "memory estimate" not in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_mistake_on_one_rank_only_ends_every_rank_at_once(tmp_path):
    injection = str(REPO / "tests" / "fault_injection")
    env = {"PYTHONPATH": os.pathsep.join([injection, os.environ.get("PYTHONPATH", "")]), "TITAN_CP_TEST_FAIL_RANK": "1"}
    started = time.monotonic()
    result = _launch(str(tmp_path), "--training.steps", "5", ngpu=2, env=env)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: injected mistake on rank 1 only"], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert elapsed < 120, f"{elapsed:.0f} s: the other rank waited for its timeout"
    assert not trainer_ranks(tmp_path)


def test_unexpected_error_on_a_hidden_rank_shows_its_traceback(tmp_path):
    """LOG_RANK shows rank 0 only; torchrun's failure report still carries rank 1's traceback."""
    injection = str(REPO / "tests" / "fault_injection")
    env = {"PYTHONPATH": os.pathsep.join([injection, os.environ.get("PYTHONPATH", "")]),
           "TITAN_CP_TEST_FAIL_RANK": "1", "TITAN_CP_TEST_FAIL_KIND": "bug"}  # fmt: skip
    result = _launch(str(tmp_path), "--training.steps", "5", ngpu=2, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "RuntimeError: injected bug on rank 1 only" in result.stderr, result.stderr[-3000:]


def test_more_processes_than_gpus_fails_on_every_rank(monkeypatch):
    """Every rank judges the node's process count, so rank 0 (a valid index) fails as well."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match=r"NGPU=2 processes per node but only 1 GPU"):
        pick_device()
