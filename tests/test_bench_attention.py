"""scripts/bench_attention.py on CPU with tiny shapes: every row present, CP outputs checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_attention.py"
TINY = ["--device", "cpu", "--dtype", "float32", "--seqlens", "64", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16", "--iters", "2", "--warmup", "1", "--rounds", "2", "--doc-len", "24",
        "--packed-mixes", "uniform", "mixed", "long"]  # fmt: skip
MIXES = ("uniform", "mixed", "long")


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), *TINY, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_table_has_every_row(two_rank_run):
    stdout, result = two_rank_run
    assert "| method | kernel | S | cp | docs | ms | TFLOP/s per GPU | efficiency | check | notes |" in stdout
    assert "7*B*H*D*S^2" in stdout and result["world_size"] == 2
    keys = {(r["method"], r["kernel"], r["seq_len"], r["cp"], r["docs"]) for r in result["rows"]}
    assert keys == {
        ("single", "sdpa_cpu", 64, 1, ""),
        ("single", "sdpa_cpu", 32, 1, ""),
        ("batch_ring", "sdpa_cpu", 64, 2, ""),
        ("ulysses", "sdpa_cpu", 64, 2, ""),
        ("native_cp/allgather", "sdpa_cpu", 64, 2, ""),
        ("native_cp/alltoall", "sdpa_cpu", 64, 2, ""),
    } | {("varlen_llama3", "sdpa_cpu", 64, cp, mix) for cp in (1, 2) for mix in MIXES} | {
        ("ulysses_varlen", "sdpa_cpu", 64, 2, mix) for mix in MIXES
    }


def test_titan_cp_rows_are_checked_and_timed(two_rank_run):
    _, result = two_rank_run
    for row in result["rows"]:
        if row["method"] in ("batch_ring", "varlen_llama3", "ulysses", "ulysses_varlen"):
            assert row["status"] == "ok", row
            assert row["check"].startswith("ok "), row
            assert float(row["check"].split()[1]) < 1e-4
            assert row["ms"] > 0 and row["tflops_per_gpu"] > 0
            # cp rows against one device (packed: the same kernel on the whole batch).
            assert (row["efficiency"] > 0) if row["cp"] > 1 else row["efficiency"] is None, row
            # Two rounds, reported as their median.
            assert len(row["times"]) == 2 and row["ms"] == pytest.approx(sum(row["times"]) / 2), row


def test_unavailable_native_kernel_is_reported_not_fatal(two_rank_run):
    """PyTorch's native CP has no CPU attention kernel: its rows say why instead of crashing."""
    _, result = two_rank_run
    native = [r for r in result["rows"] if r["method"].startswith("native_cp")]
    # The reason names the missing CPU kernel, not an ImportError of the private set_rotate_method.
    assert native and all(r["status"].startswith("n/a (NotImplementedError: ") for r in native), native
    assert all(r["ms"] is None for r in native)


def test_flops_formula():
    bench = load_script("bench_attention")
    b, h, d, s = 2, 4, 16, 64
    assert bench.causal_flops([[s]] * b, h, d) == 7 * b * h * d * s * s
    assert bench.causal_flops([[40, 24]], h, d) == 7 * h * d * (40**2 + 24**2)
    lengths = bench.document_lengths(1000, 100, torch.Generator().manual_seed(0))
    assert sum(lengths) == 1000 and min(lengths) >= 1 and len(lengths) > 3
    gen = torch.Generator().manual_seed(0)
    assert bench.PACKED_MIXES["uniform"](32768, 8192, gen) == [8192] * 4
    assert bench.PACKED_MIXES["long"](32768, 8192, gen) == [32768]
    mixed = bench.PACKED_MIXES["mixed"](131072, 8192, gen)
    assert sum(mixed) == 131072 and max(mixed) <= 16384 and min(mixed[:-1]) >= 256


def _checked_ring_rows(rank: int, world: int) -> list[str]:
    """The ring row's check as is, and with rank 1's output shifted by 0.05."""
    bench = load_script("bench_attention")
    args = bench.parse_args(TINY)
    device = torch.device("cpu")
    inputs = bench.make_inputs(args, 64, device)
    reference = lambda: bench.sdpa_reference(bench.dense_inputs(inputs))  # noqa: E731

    def build(perturb: float):
        method = bench.ring_method(inputs, "sdpa_cpu", rank, world, device)
        step = method.step
        method.step = lambda: tuple(t + perturb if i == 0 and rank == 1 else t for i, t in enumerate(step()))
        return method

    return [
        bench.run_row(bench.Row("batch_ring", "sdpa_cpu", 64, world), lambda: build(p), args, world, device, reference).check
        for p in (0.0, 0.05)
    ]


def test_check_catches_a_wrong_cp_output():
    """The same check that passes the ring fails it when one rank's output is off."""
    for good, bad in run_distributed(_checked_ring_rows, 2):
        assert good.startswith("ok ") and bad.startswith("FAIL "), (good, bad)
