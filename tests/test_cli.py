"""The user's entry point: the default job, exact step counts, and one-line errors."""

import os
import subprocess
import sys

import pytest

from tests.train_utils import REPO, assert_one_error_line, read_metrics, run_train
from titan_cp.config.schema import Training
from titan_cp.data import Tokenizer, build_dataloader

def test_default_job_learns(tmp_path):
    """The README's first command: the debug model's loss falls by at least 2 on the shipped data."""
    result = run_train(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # A fresh install's first run is quiet: no warning from titan_cp, torch or torchrun.
    assert "warning" not in (result.stdout + result.stderr).lower(), (result.stdout + result.stderr)[-3000:]
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 150
    assert records[0]["loss"] - records[-1]["loss"] >= 2.0, (records[0]["loss"], records[-1]["loss"])


def test_three_steps_write_three_records(tmp_path):
    result = run_train(tmp_path, "--training.steps", "3", "--metrics.log_freq", "1", "--training.seq_len", "64")
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    expected_keys = {"step", "loss", "grad_norm", "lr", "tps", "tflops", "mfu", "memory_gib", "ntokens_seen"}
    assert expected_keys <= set(records[0])
    # Target tokens are counted once: 8 sequences of 64 tokens per step, less the labels that are
    # not targets (a window's label slot before a document's BOS), counted here from the loader.
    loader = build_dataloader(Training(seq_len=64, local_batch_size=8), Tokenizer(REPO / "assets/tokenizer/tokenizer.json"), 0, 1, 0)
    per_step = [int((next(loader).labels != -100).sum()) for _ in range(3)]
    assert all(480 < n < 512 for n in per_step)
    assert [r["ntokens_seen"] for r in records] == [sum(per_step[: i + 1]) for i in range(3)]
    # The lr each step used: the debug config's warmup (10 steps) is cut to the run's 3, and
    # step s of a W-step warmup runs at lr * s / (W + 1) (docs/config.md).
    assert [r["lr"] for r in records] == pytest.approx([3e-3 * s / 4 for s in (1, 2, 3)])
    lines = result.stdout.splitlines()
    assert len([line for line in lines if "warmup_steps 10 is not shorter than training.steps 3" in line]) == 1
    assert any("step 3/3" in line and " eta " in line for line in lines), result.stdout[-2000:]
    assert any("done: 3 steps (1-3)" in line and f"{sum(per_step):,} tokens" in line for line in lines), result.stdout[-2000:]


def _launch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Through the user's launcher (torchrun), as the README starts it."""
    return subprocess.run(
        ["bash", "scripts/run_train.sh", *args, "--job.dump_folder", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NGPU": "1"},
    )


def _run_trainer(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """The same trainer without torchrun (faster); a leading .toml path is the config file."""
    config = "train_configs/debug_model.toml"
    if args and not args[0].startswith("--"):
        config, args = args[0], args[1:]
    return subprocess.run(
        [sys.executable, "-m", "titan_cp.train", "--job.config_file", config, *args,
         "--job.dump_folder", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _write(path, content: str | bytes):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


BAD_INPUTS = {
    "unknown section": (lambda d: [_write(d / "c.toml", "[trainingz]\nsteps = 1\n")], ["trainingz"]),
    "unknown key": (lambda d: [_write(d / "c.toml", "[training]\nstepz = 1\n")], ["stepz", "c.toml"]),
    "unknown override": (lambda d: ["--training.stepz", "3"], ["training.stepz"]),
    "wrong type": (lambda d: ["--training.steps", "many"], ["training.steps", "many"]),
    "negative steps": (lambda d: ["--training.steps", "-5"], ["training.steps"]),
    "zero seq_len": (lambda d: ["--training.seq_len", "0"], ["training.seq_len"]),
    "missing config": (lambda d: [str(d / "nope.toml")], ["nope.toml"]),
    "missing tokenizer": (lambda d: ["--model.tokenizer_path", str(d / "tok.json")], ["tok.json"]),
    "missing data": (lambda d: ["--training.dataset_path", str(d / "data.txt")], ["data.txt"]),
    "empty dataset": (lambda d: ["--training.dataset_path", _write(d / "empty.txt", "")], ["empty.txt"]),
    "not utf-8": (lambda d: ["--training.dataset_path", _write(d / "latin1.txt", "caf\xe9 ".encode("latin-1") * 50)], ["latin1.txt"]),
    "8B on this CPU": (lambda d: ["train_configs/llama3_8b.toml", "--parallelism.context_parallel_degree", "1"], ["GiB"]),
    "bad degree": (lambda d: ["--parallelism.data_parallel_shard_degree", "2"], ["world size is 1"]),
    "bad global batch": (lambda d: ["--training.global_batch_size", "12"], ["training.global_batch_size", "8"]),
}


# These go through torchrun: errors before and after the process group starts, and a config path.
THROUGH_LAUNCHER = {"unknown override", "missing config", "bad degree", "8B on this CPU"}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line(case, tmp_path):
    make_args, words = BAD_INPUTS[case]
    run = _launch if case in THROUGH_LAUNCHER else _run_trainer
    result = run(tmp_path, *make_args(tmp_path))
    assert_one_error_line(result, words)
