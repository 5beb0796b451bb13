"""Throughput, FLOPs, memory and progress, printed and appended to metrics.jsonl (and TensorBoard / W&B).

FLOPs per token: 6 * N_non_embedding for the matmuls plus the attention term.
Causal attention does half the work of full attention, so we report 6*L*H*d*S ("causal") and
also torchtitan's 12*L*H*d*S, which ignores the causal half, so figures compare with theirs.
"""

import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from titan_cp.config.schema import Metrics
from titan_cp.metrics_backends import MetricsBackend, build_backends
from titan_cp.output_folder import keep_earlier_run

# Dense bf16 peak of an H100/H200 SXM; MFU is reported against it on CUDA.
PEAK_BF16_FLOPS = 989e12


@dataclass(frozen=True)
class FlopsPerToken:
    causal: float
    torchtitan: float


def flops_per_token(
    non_embedding_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int,
    keys_per_token: float | None = None,
) -> FlopsPerToken:
    """Training FLOPs per token (forward + backward) at full sequence length `seq_len`.

    The causal attention term is 12*L*H*d per key a query attends to (QK^T and PV, 2 FLOPs per
    multiply-add, x3 with the backward): `keys_per_token` keys on average, seq_len / 2 for
    a plain causal window (6*L*H*d*S). With packed documents a query sees only its document's
    earlier tokens, so pass `mean_causal_keys` of the packed windows: MFU then counts only the
    pairs documents really compute. The torchtitan figure keeps its full-window 12*L*H*d*S.
    """
    dense = 6 * non_embedding_params
    keys = seq_len / 2 if keys_per_token is None else keys_per_token
    return FlopsPerToken(
        causal=dense + 12 * n_layers * n_heads * head_dim * keys,
        torchtitan=dense + 12 * n_layers * n_heads * head_dim * seq_len,
    )


def mean_causal_keys(positions: torch.Tensor) -> float:
    """Mean number of keys a query attends to in packed windows `[N, S]`: a document starts where
    its position is 0 and at every window start (padding counts as a document of its own)."""
    count, seq_len = positions.shape
    index = torch.arange(seq_len).expand(count, seq_len)
    starts = torch.where((positions == 0) | (index == 0), index, torch.zeros_like(index))
    keys = index - starts.cummax(dim=1).values + 1
    return keys.double().mean().item()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tb"


class MetricsLogger:
    """Prints one line and writes one record per logged step; only the writer (rank 0) writes.

    Every rank calls `step_done` after each step, `count` with the tokens trained since its last
    call (at least before each `log`), and `log` at the same steps; `log_validation`
    records a validation loss; `finish` prints the run's summary. Records go to
    `{dump_folder}/metrics.jsonl` (one JSON object per line: training steps have "loss",
    validation records "validation_loss") and to the backends `cfg` turns on (TensorBoard under
    `{dump_folder}/tb`, W&B with `run_config` as the run's config).

    A new run (`start_step` 0) moves an earlier run's metrics.jsonl and TensorBoard folder aside;
    a resumed run appends to them.
    """

    def __init__(
        self,
        dump_folder: str,
        flops: FlopsPerToken,
        device: torch.device,
        is_writer: bool,
        world_size: int,
        total_steps: int,
        start_step: int,
        cfg: Metrics | None = None,
        run_config: dict | None = None,
    ):
        self.flops = flops
        self.device = device
        self.is_writer = is_writer
        self.world_size = world_size
        self.total_steps = total_steps
        self.start_step = start_step
        self.backends: list[MetricsBackend] = []
        self.path = os.path.join(dump_folder, METRICS_FILE)
        self.run_start = time.perf_counter()
        self.first_step_end: float | None = None
        self.last_step = start_step
        self.run_tokens = 0
        self.window_start = self.run_start
        self.window_tokens = 0
        if is_writer:
            self._start_file(dump_folder)
            # After _start_file, which moves an earlier run's TensorBoard folder aside.
            tensorboard_folder = os.path.join(dump_folder, TENSORBOARD_FOLDER)
            self.backends = build_backends(cfg or Metrics(), tensorboard_folder, dump_folder, run_config or {})

    def _start_file(self, dump_folder: str) -> None:
        if self.start_step > 0:
            print(f"resuming at step {self.start_step + 1}: appending to {self.path}", flush=True)
            return
        kept = keep_earlier_run(dump_folder, [METRICS_FILE, TENSORBOARD_FOLDER])
        if kept:
            print(f"{dump_folder} holds an earlier run's metrics, kept as {', '.join(kept)}", flush=True)

    def step_done(self, step: int) -> None:
        """Note that `step` has been issued (for the time estimate; no device value is read)."""
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()
        self.last_step = step

    def count(self, tokens: int) -> None:
        """Add real (non-padding) tokens over all devices, trained since the last call."""
        self.run_tokens += tokens
        self.window_tokens += tokens

    def seconds_left(self) -> float | None:
        """Estimated from the steps after this run's first (which includes compilation and warm-up)."""
        now = time.perf_counter()
        done_after_first = self.last_step - self.start_step - 1
        if self.first_step_end is None:
            return None
        if done_after_first > 0:
            per_step = (now - self.first_step_end) / done_after_first
        else:
            per_step = now - self.run_start
        return per_step * (self.total_steps - self.last_step)

    def log(self, step: int, loss: float, grad_norm: float, lr: float, ntokens_seen: int) -> dict:
        elapsed = time.perf_counter() - self.window_start
        tps = self.window_tokens / self.world_size / elapsed
        tflops = tps * self.flops.causal / 1e12
        tflops_torchtitan = tps * self.flops.torchtitan / 1e12
        on_gpu = self.device.type == "cuda"
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tps": tps,
            "tflops": tflops,
            "mfu": 100 * tflops * 1e12 / PEAK_BF16_FLOPS if on_gpu else None,
            "tflops_torchtitan": tflops_torchtitan,
            "mfu_torchtitan": 100 * tflops_torchtitan * 1e12 / PEAK_BF16_FLOPS if on_gpu else None,
            "memory_gib": peak_memory_gib(self.device),
            "ntokens_seen": ntokens_seen,
            "eta_seconds": self.seconds_left(),
        }
        if self.is_writer:
            mfu = f"mfu {record['mfu']:.1f}% (torchtitan formula {record['mfu_torchtitan']:.1f}%)" if on_gpu else "mfu n/a on CPU"
            width = len(str(self.total_steps))
            print(
                f"step {step:{width}d}/{self.total_steps}  loss {loss:8.4f}  grad_norm {grad_norm:7.3f}  lr {lr:.2e}  "
                f"tps/device {tps:9.0f}  tflops/device {tflops:7.2f}  {mfu}  "
                f"memory {record['memory_gib']:.2f} GiB  eta {format_duration(record['eta_seconds'])}",
                flush=True,
            )
            self._write(record)
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        return record

    def leave_out(self, seconds: float) -> None:
        """Leave `seconds` spent on something other than training (validation, writing a trace)
        out of the next record's throughput."""
        self.window_start += seconds

    def log_validation(self, step: int, loss: float, tokens: int, seconds_outside_training: float = 0.0) -> dict:
        """Record the validation loss (over `tokens` targets) measured after `step`, the same on
        every rank; the seconds it took are left out of the next record's throughput."""
        self.leave_out(seconds_outside_training)
        record = {"step": step, "validation_loss": loss, "validation_tokens": tokens}
        if self.is_writer:
            print(f"step {step}/{self.total_steps}  validation loss {loss:8.4f} over {tokens:,} tokens", flush=True)
            self._write(record)
        return record

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {key: value for key, value in record.items() if key != "step" and value is not None}
        for backend in self.backends:
            backend.write(record["step"], scalars)

    def finish(self) -> str:
        """Print the one-line summary of this run (steps, tokens, time, throughput, peak memory)."""
        wall = time.perf_counter() - self.run_start
        steps = self.last_step - self.start_step
        line = (
            f"done: {steps} steps ({self.start_step + 1}-{self.last_step}) in {format_duration(wall)},"
            f" {self.run_tokens:,} tokens, {self.run_tokens / wall:,.0f} tokens/s over {self.world_size}"
            f" device(s), peak memory {peak_memory_gib(self.device):.2f} GiB per device"
        )
        if self.is_writer:
            print(line, flush=True)
        return line

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def format_duration(seconds: float | None) -> str:
    """3723 -> '1h02m', 185 -> '3m05s', 7.5 -> '8s', None (not known yet) -> '?'."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def print_rank0(message: str, rank: int) -> None:
    if rank == 0:
        print(message, file=sys.stdout, flush=True)
