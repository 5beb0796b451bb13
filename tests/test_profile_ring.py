"""scripts/profile_ring.py: the split of a trace into attention, other compute, idle and NCCL
time, and the rows `--packed` profiles.

The profiler itself needs CUDA; the arithmetic over its Chrome trace is checked here on a
trace whose answer is known, and the packed rows run on CPU over gloo.
"""

import json

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.script_utils import load_script


def _kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}


def test_split_trace(tmp_path):
    # Two steps of 10 ms each (20,000 us). Compute stream: attention 0-6 ms and 10-16 ms, a merge
    # kernel 6-7 and 16-17 ms overlapping nothing, a copy 5-6.5 ms overlapping attention.
    # NCCL runs 2-9 ms on its own stream (overlapping compute) and must not count as busy.
    events = [
        _kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 0, 6000),
        _kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 10000, 6000),
        _kernel("vectorized_elementwise_kernel<lerp>", 6000, 1000),
        _kernel("vectorized_elementwise_kernel<lerp>", 16000, 1000),
        _kernel("Memcpy DtoD", 5000, 1500, cat="gpu_memcpy"),
        _kernel("ncclDevKernel_SendRecv", 2000, 7000),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50000},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    split = load_script("profile_ring").split_trace(str(trace), steps=2, step_ms=10.0)
    assert split["attention_ms"] == pytest.approx(6.0)
    assert split["other_compute_ms"] == pytest.approx(1.75)  # (2 x 1000 + 1500) / 2 steps
    assert split["nccl_ms"] == pytest.approx(3.5)
    # Busy: 0-7 ms and 10-17 ms = 14 ms over 2 steps, so 3 ms idle per 10 ms step.
    assert split["idle_ms"] == pytest.approx(3.0)
    assert split["top_other"][0] == ("vectorized_elementwise_kernel<lerp>", 1.0)


def _packed_rows(rank: int, world: int) -> list[tuple]:
    profile = load_script("profile_ring")
    args = profile.parse_args([
        "--packed", "uniform", "--seq-len", "256", "--packed-doc-len", "64", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "16", "--kernel", "sdpa_cpu", "--dtype", "float32",
    ])  # fmt: skip
    device = torch.device("cpu")
    inputs = profile.bench.make_inputs(args, args.seq_len, device)
    rows = []
    for gqa, name, step, work in profile.planned_steps(args, inputs, rank, world, device):
        out = step()[0].detach()
        rows.append((gqa, name, work, float(out.double().abs().sum())))
    return rows


def test_packed_rows_are_the_single_gpu_kernel_the_all_gather_and_ulysses():
    """`--packed`: three rows over the same documents; the cp rows' shards add up to the
    single-GPU output, and each GPU is credited half the documents' FLOPs."""
    per_rank = run_distributed(_packed_rows, 2)
    names = [name for _, name, _, _ in per_rank[0]]
    assert names == ["single varlen S=256", "allgather S=256 cp=2", "ulysses varlen S=256 cp=2"]
    (_, _, single_work, single_sum), *cp_rows = per_rank[0]
    for index, (gqa, _, work, _) in enumerate(cp_rows, start=1):
        assert gqa == "native" and work == pytest.approx(single_work / 2)
        assert sum(rows[index][3] for rows in per_rank) == pytest.approx(single_sum, rel=1e-5)
