"""The user's entry point: the default job, exact step counts, and one-line errors."""

import os
import subprocess
import sys

import pytest

from tests.train_utils import REPO, assert_one_error_line, read_metrics, run_train

def test_default_job_learns(tmp_path):
    """The README's first command: the debug model's loss falls by at least 2 on the shipped data."""
    result = run_train(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
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
    # Tokens are counted once: 8 sequences of 64 tokens per step.
    assert [r["ntokens_seen"] for r in records] == [512, 1024, 1536]


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
