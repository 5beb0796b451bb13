"""scripts/profile_ring.py's split of a trace into attention, other compute, idle and NCCL time.

The profiler itself needs CUDA; the arithmetic over its Chrome trace is checked here on a
trace whose answer is known.
"""

import json

import pytest

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
