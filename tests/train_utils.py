"""Run the real launcher (`scripts/run_train.sh`) in a subprocess and read its metrics."""

import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Small enough for 4 CPU processes on 2 cores; the debug model's shapes otherwise.
TINY = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "2",
    "--metrics.log_freq", "1",
    "--debug.deterministic", "true",
    "--lr_scheduler.warmup_steps", "2",
]


def run_train(dump_folder: Path, *overrides: str, ngpu: int = 1, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    # Several ranks share the cores; a single process keeps torch's default threads.
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ngpu))}
    full_env = {**os.environ, "NGPU": str(ngpu), **threads, **(env or {})}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "run_train.sh"), "train_configs/debug_model.toml",
         "--job.dump_folder", str(dump_folder), *overrides],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(dump_folder: Path) -> list[dict]:
    with open(dump_folder / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_curves(dump_folder: Path, *overrides: str, ngpu: int = 1) -> dict[str, list[float]]:
    """Per-step `loss` and `grad_norm` of a tiny launcher run that logs every step."""
    result = run_train(dump_folder, *TINY, *overrides, ngpu=ngpu)
    assert result.returncode == 0, f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    records = [record for record in read_metrics(dump_folder) if "loss" in record]
    return {key: [record[key] for record in records] for key in ("loss", "grad_norm")}


def train_losses(dump_folder: Path, *overrides: str, ngpu: int = 1) -> list[float]:
    return train_curves(dump_folder, *overrides, ngpu=ngpu)["loss"]


def assert_close_losses(actual: list[float], expected: list[float], rtol: float, what: str = "loss") -> None:
    assert len(actual) == len(expected), (actual, expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= rtol * abs(e), f"step {step} {what}: {a} vs {e} (rtol {rtol})\n{actual}\n{expected}"


# The reported gradient norm is an fp32 reduction over each whole gradient; on CPU the unsharded
# run's norm of the debug model's gradients is off by up to 1.2e-4 relative from the float64 norm
# of the same gradients (the sharded runs' partial sums are shorter and closer). A gradient-scale
# mistake (a factor of dp or cp) is orders of magnitude larger than this tolerance.
GRAD_NORM_RTOL = 1e-3


def assert_close_curves(actual: dict[str, list[float]], expected: dict[str, list[float]], rtol: float) -> None:
    """Losses (within `rtol`) and gradient norms agree step by step. Equal losses alone cannot
    reveal a constant error in the gradient scale: AdamW normalises it away, and clipping hides it."""
    assert_close_losses(actual["loss"], expected["loss"], rtol, "loss")
    assert_close_losses(actual["grad_norm"], expected["grad_norm"], max(rtol, GRAD_NORM_RTOL), "grad_norm")


def assert_one_error_line(result: subprocess.CompletedProcess, words: list[str]) -> None:
    """A user mistake: exit code 2, no traceback, one `error:` line naming every word."""
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    for word in words:
        assert word in error_lines[0], error_lines[0]


def start_training(dump_folder: Path, *overrides: str, ngpu: int, timeout: float = 180) -> subprocess.Popen:
    """Start the launcher in the background and return once the first metrics record exists.

    The launcher leads a process group of its own, as a shell job would (see tests/test_interrupt.py).
    """
    launcher = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "run_train.sh"), "train_configs/debug_model.toml",
         "--job.dump_folder", str(dump_folder), *overrides],
        cwd=REPO, env={**os.environ, "NGPU": str(ngpu), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    metrics = dump_folder / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.stat().st_size > 0):
        if launcher.poll() is not None:
            raise AssertionError(f"the run ended before training:\n{launcher.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            launcher.kill()
            raise AssertionError("training did not start")
        time.sleep(0.5)
    return launcher


def trainer_ranks(dump_folder: Path) -> dict[int, int]:
    """RANK -> pid of every live trainer process (not torchrun) of the run writing to `dump_folder`."""
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
