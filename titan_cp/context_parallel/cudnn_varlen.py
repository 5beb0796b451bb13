"""cuDNN's packed-document (THD) attention, through the optional `nvidia-cudnn-frontend` package.

PyTorch has no cuDNN varlen attention with a backward that takes a saved LSE (its own varlen API
runs FA2), and cuDNN is 1.6x faster than FA2 on Hopper for packed documents (docs/performance.md).
nvidia-cudnn-frontend (1.32+, the optional `cudnn` extra) registers two torch custom ops when
its `cudnn.sdpa_torch` attribute is first read; we call them and nothing else of the package:

- `torch.ops.cudnn.sdpa_fwd(q, k, v, scale, is_causal, causal_bottom_right, cu_seqlens_q=...,
  cu_seqlens_kv=..., max_seqlen_q=..., max_seqlen_kv=..., return_lse=True)` on packed
  `(T, H, D)` tensors with int32 `(segments + 1)` cu_seqlens; it returns the output and the
  natural-log LSE of the scaled scores as `(T_q, H_q, 1)` fp32. GQA is native.
- `torch.ops.cudnn.sdpa_bwd(dout, q, k, v, out, lse, scale, ...)` with the same segment
  arguments; it wants the LSE *padded*, `(segments, H_q, max_seqlen_q, 1)` (a cuDNN backend
  restriction the package documents), rows past a segment's length ignored.

The package caches one built cuDNN graph per shape key, which includes the segment count and the
max lengths. Packed batches change those every step, so the max lengths are rounded up to a power
of two (they are only bounds): consecutive batches then reuse the built graphs.

The padded LSE costs `segments x H_q x max_q x 4` bytes. A batch with very many short documents
and one long one would make that far larger than the packed LSE; such a batch runs the FA2
varlen kernel instead (`fits`), decided from the segments so forward and backward agree.
tests/test_varlen_attention.py checks this path against per-document SDPA and against FA2 on GPU.
"""

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from titan_cp.context_parallel.varlen_kernels import VarlenSegments
from titan_cp.extras import install_hint

CUDNN_INSTALL_HINT = install_hint("cudnn")
# Padded-LSE rows allowed per query token (and at least this many rows) before FA2 is used.
_PADDED_ROWS_PER_TOKEN = 16
_PADDED_ROWS_MIN = 1 << 20


@functools.cache
def cudnn_varlen_available() -> bool:
    """True when the cuDNN THD ops can be registered here (CUDA and the package installed)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cudnn

        cudnn.sdpa_torch  # noqa: B018 - reading the lazy export registers torch.ops.cudnn.sdpa_*
    except Exception:  # ImportError, or a native library of the package that fails to load
        return False
    return hasattr(torch.ops.cudnn, "sdpa_fwd") and hasattr(torch.ops.cudnn, "sdpa_bwd")


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class _Prepared:
    """What the cuDNN calls need beyond the segments: bucketed bounds, padded-LSE indices."""

    max_q: int
    max_k: int
    segment_of_token: Tensor  # query token -> its segment
    position_in_segment: Tensor  # query token -> its row within the segment


_prepared: "weakref.WeakKeyDictionary[VarlenSegments, _Prepared]" = weakref.WeakKeyDictionary()


def _prepare(seg: VarlenSegments) -> _Prepared:
    hit = _prepared.get(seg)
    if hit is None:
        lengths = torch.tensor([e - s for s, e in zip(seg.q_bounds, seg.q_bounds[1:])])
        segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        starts = torch.tensor(seg.q_bounds[:-1])
        position = torch.arange(seg.q_bounds[-1]) - starts[segment]
        device = seg.cu_q.device
        hit = _Prepared(_bucket(seg.max_q), _bucket(seg.max_k), segment.to(device), position.to(device))
        _prepared[seg] = hit
    return hit


def fits(seg: VarlenSegments) -> bool:
    """Whether the padded LSE of these segments stays small enough for the cuDNN path."""
    padded_rows = (len(seg.q_bounds) - 1) * _bucket(seg.max_q)
    return padded_rows <= max(_PADDED_ROWS_PER_TOKEN * seg.q_bounds[-1], _PADDED_ROWS_MIN)


def _segment_args(seg: VarlenSegments, prepared: _Prepared) -> dict:
    return dict(
        is_causal=True,
        # Top-left is the faster kernel; it equals bottom-right when every segment is square.
        causal_bottom_right=not seg.square,
        cu_seqlens_q=seg.cu_q,
        cu_seqlens_kv=seg.cu_k,
        max_seqlen_q=prepared.max_q,
        max_seqlen_kv=prepared.max_k,
    )


def cudnn_varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, seg: VarlenSegments, scale: float
) -> tuple[Tensor, Tensor]:
    """Out `[Tq, Hq, D]` and lse `[Hq, Tq]` fp32 (a transposed view of cuDNN's `(Tq, Hq, 1)`)."""
    out, stats = torch.ops.cudnn.sdpa_fwd(q, k, v, scale, return_lse=True, **_segment_args(seg, _prepare(seg)))
    return out, stats.squeeze(-1).t()


def cudnn_varlen_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, seg: VarlenSegments, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    prepared = _prepare(seg)
    padded = lse.new_zeros(len(seg.q_bounds) - 1, lse.shape[0], prepared.max_q)
    padded[prepared.segment_of_token, :, prepared.position_in_segment] = lse.t()
    # Dense (T, H, D) operands: with one head group's slice of Q, O and dO (token stride > H·D)
    # the 1.32 backward returned a wrong dQ on an H200 while out, dK and dV were right
    # (tests/test_varlen_attention.py, cp = 2 on one GPU). No copy at cp = 1.
    q, out, dout = q.contiguous(), out.contiguous(), dout.contiguous()
    return torch.ops.cudnn.sdpa_bwd(
        dout, q, k, v, out, padded.unsqueeze(-1), scale, **_segment_args(seg, prepared)
    )
