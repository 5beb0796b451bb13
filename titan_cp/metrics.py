"""Throughput, FLOPs and memory accounting, printed and appended to metrics.jsonl.

FLOPs per token follow DESIGN.md: 6 * N_non_embedding for the matmuls plus the attention term.
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


class MetricsLogger:
    """Prints one line and appends one JSON record per logged step (rank 0 only writes)."""

    def __init__(self, dump_folder: str, flops: FlopsPerToken, device: torch.device, is_writer: bool):
        self.flops = flops
        self.device = device
        self.is_writer = is_writer
        self.path = os.path.join(dump_folder, "metrics.jsonl")
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        if is_writer:
            os.makedirs(dump_folder, exist_ok=True)

    def count(self, tokens_per_device: int) -> None:
        """Add the real (non-padding) tokens one device processed since the last record."""
        self.window_tokens += tokens_per_device

    def log(self, step: int, loss: float, grad_norm: float, lr: float, ntokens_seen: int) -> dict:
        elapsed = time.perf_counter() - self.window_start
        tps = self.window_tokens / elapsed
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
        }
        if self.is_writer:
            mfu = f"mfu {record['mfu']:.1f}% (torchtitan formula {record['mfu_torchtitan']:.1f}%)" if on_gpu else "mfu n/a on CPU"
            print(
                f"step {step:5d}  loss {loss:8.4f}  grad_norm {grad_norm:7.3f}  lr {lr:.2e}  "
                f"tps/device {tps:9.0f}  tflops/device {tflops:7.2f}  {mfu}  "
                f"memory {record['memory_gib']:.2f} GiB",
                flush=True,
            )
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        return record


def print_rank0(message: str, rank: int) -> None:
    if rank == 0:
        print(message, file=sys.stdout, flush=True)
