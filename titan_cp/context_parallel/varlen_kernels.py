"""Varlen (packed-document) attention implementations that return the log-sum-exp.

Queries and keys are packed token-major, `[tokens, heads, head_dim]`, and cut into segments by
`cu_q` / `cu_k`: query segment i attends to key segment i only. A query segment may be shorter
than its key segment (under cp the local queries of a document are the *last* tokens of the
document's span up to them), so the causal mask is aligned bottom-right: query j of a segment
with nq queries and nk keys sees keys 0..j + nk - nq. That is FA2's varlen `causal=True`
convention; the CPU path reproduces it and the cuDNN path (cudnn_varlen.py) asks for it.

The LSE is returned `[heads_q, tokens_q]` in fp32 (FA2's varlen layout) and handed back to the
backward, which then needs no forward recompute beyond the scores. Which implementation runs for
a `model.attn_implementation` is decided in one place, the kernel registry in kernels.py.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from titan_cp.context_parallel.flash_attn_package import call_flash_attn, import_flash_attn_interface


@dataclass(frozen=True, eq=False)
class VarlenSegments:
    """Where the segments of the packed queries and keys start and end.

    `cu_q` / `cu_k` are int32 tensors on the compute device (what the CUDA kernels read);
    `q_bounds` / `k_bounds` are the same numbers as Python ints (what the CPU path loops over and
    the cuDNN path sizes its padded LSE from, with no device-to-host copy per call). Compared and
    hashed by identity: kernels may remember per-segments preparations (cudnn_varlen.py).
    """

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    q_bounds: tuple[int, ...]
    k_bounds: tuple[int, ...]

    @classmethod
    def from_bounds(cls, q_bounds: list[int], k_bounds: list[int], device) -> "VarlenSegments":
        q_len = [e - s for s, e in zip(q_bounds, q_bounds[1:])]
        k_len = [e - s for s, e in zip(k_bounds, k_bounds[1:])]
        return cls(
            cu_q=torch.tensor(q_bounds, dtype=torch.int32, device=device),
            cu_k=torch.tensor(k_bounds, dtype=torch.int32, device=device),
            max_q=max(q_len, default=0),
            max_k=max(k_len, default=0),
            q_bounds=tuple(q_bounds),
            k_bounds=tuple(k_bounds),
        )

    @property
    def square(self) -> bool:
        """Every segment has as many queries as keys (top-left and bottom-right causal agree)."""
        return self.q_bounds == self.k_bounds


# --- CUDA: FA2 varlen -------------------------------------------------------------------------
# Private aten ops, on purpose. `torch.nn.attention.varlen.varlen_attn` is the public varlen API,
# but it only offers forward + its own autograd. The all-gather attention must run the backward
# per KV-head group against K/V it re-gathers in its own backward, with the out/LSE it saved;
# varlen_attn's backward is itself a private op (`torch_attn::_varlen_attn_backward`) wrapping
# `aten::_flash_attention_backward`. So we call the aten forward/backward pair varlen_attn wraps,
# with the same arguments it passes. tests/test_varlen_attention.py pins their schemas.


def flash_varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, seg: VarlenSegments, scale: float
) -> tuple[Tensor, Tensor]:
    out, lse, _rng, _unused, _mask = torch.ops.aten._flash_attention_forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        seg.cu_q,
        seg.cu_k,
        seg.max_q,
        seg.max_k,
        0.0,  # dropout_p
        True,  # is_causal: FA2 aligns it bottom-right when a segment has fewer queries than keys
        False,  # return_debug_mask
        scale=scale,
    )
    return out, lse


def flash_varlen_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    seg: VarlenSegments,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    # Without dropout the kernel never reads the RNG state; varlen_attn passes these same values.
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        seg.cu_q,
        seg.cu_k,
        seg.max_q,
        seg.max_k,
        0.0,
        True,
        rng_state,
        unused,
        scale=scale,
    )
    return dq, dk, dv


# --- the flash-attn package's FA2 varlen functions (optional extra) ---------------------------


def package_varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, seg: VarlenSegments, scale: float
) -> tuple[Tensor, Tensor]:
    interface = import_flash_attn_interface()
    outputs = call_flash_attn(
        interface._flash_attn_varlen_forward, q=q.contiguous(), k=k.contiguous(),
        v=v.contiguous(), cu_seqlens_q=seg.cu_q, cu_seqlens_k=seg.cu_k, max_seqlen_q=seg.max_q,
        max_seqlen_k=seg.max_k, dropout_p=0.0, softmax_scale=scale, causal=True,
        return_softmax=False,
    )  # fmt: skip
    # flash-attn 2.6+ returns (out, lse, S_dmask, rng_state); earlier 2.x an 8-tuple, lse 6th.
    return outputs[0], outputs[1] if len(outputs) == 4 else outputs[5]


def package_varlen_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    seg: VarlenSegments,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    interface = import_flash_attn_interface()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    call_flash_attn(
        interface._flash_attn_varlen_backward, dout=dout.contiguous(), q=q, k=k, v=v,
        out=out.contiguous(), softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
        cu_seqlens_q=seg.cu_q, cu_seqlens_k=seg.cu_k, max_seqlen_q=seg.max_q,
        max_seqlen_k=seg.max_k, dropout_p=0.0, softmax_scale=scale, causal=True,
        deterministic=False,
    )  # fmt: skip
    return dq, dk, dv


# --- CPU (and any device): exact masked math per segment, fp32 -------------------------------
# One score matrix per document segment, so memory is sum(nq_i * nk_i), never total^2.


def _segments(seg: VarlenSegments):
    bounds = zip(seg.q_bounds[:-1], seg.q_bounds[1:], seg.k_bounds[:-1], seg.k_bounds[1:])
    for q0, q1, k0, k1 in bounds:
        yield slice(q0, q1), slice(k0, k1)


def _grouped(x: Tensor, n_kv: int) -> Tensor:
    """[n, Hq, D] -> [Hkv, Hq/Hkv, n, D] fp32: query heads grouped under their KV head."""
    n, hq, d = x.shape
    return x.float().view(n, n_kv, hq // n_kv, d).permute(1, 2, 0, 3)


def _ungrouped(x: Tensor) -> Tensor:
    """Inverse of `_grouped`: [Hkv, G, n, D] -> [n, Hkv * G, D]."""
    n_kv, g, n, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(n, n_kv * g, d)


def _scores(qg: Tensor, kg: Tensor, scale: float) -> Tensor:
    """Bottom-right causal scores [Hkv, G, nq, nk] for one segment."""
    nq, nk = qg.shape[2], kg.shape[2]
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    qi = torch.arange(nq, device=qg.device).unsqueeze(1)
    kj = torch.arange(nk, device=qg.device).unsqueeze(0)
    return s.masked_fill(kj > qi + (nk - nq), float("-inf"))


def math_varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, seg: VarlenSegments, scale: float
) -> tuple[Tensor, Tensor]:
    n_kv = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for qs, ks in _segments(seg):
        qg = _grouped(q[qs], n_kv)
        kg = k[ks].float().permute(1, 0, 2).unsqueeze(1)
        vg = v[ks].float().permute(1, 0, 2).unsqueeze(1)
        s = _scores(qg, kg, scale)
        seg_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - seg_lse.unsqueeze(-1))
        out[qs] = _ungrouped(torch.matmul(p, vg)).to(q.dtype)
        lse[:, qs] = seg_lse.flatten(0, 1)
    return out, lse


def math_varlen_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    seg: VarlenSegments,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    n_kv = k.shape[1]
    dq = torch.empty_like(q)
    # Zero, not empty: a key no segment reads gets no gradient.
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for qs, ks in _segments(seg):
        qg = _grouped(q[qs], n_kv)
        kg = k[ks].float().permute(1, 0, 2).unsqueeze(1)
        vg = v[ks].float().permute(1, 0, 2).unsqueeze(1)
        dog = _grouped(dout[qs], n_kv)
        og = _grouped(out[qs], n_kv)
        seg_lse = lse[:, qs].reshape(n_kv, -1, qg.shape[2], 1)
        p = torch.exp(_scores(qg, kg, scale) - seg_lse)
        # softmax backward: dS = P * (dP - rowsum(dO * O)), the same identity FA2 uses.
        dp = torch.matmul(dog, vg.transpose(-1, -2))
        ds = p * (dp - (dog * og).sum(dim=-1, keepdim=True))
        dq[qs] = _ungrouped(torch.matmul(ds, kg) * scale).to(q.dtype)
        # The G query heads that share a KV head add up into its gradient.
        dkg = torch.matmul(ds.transpose(-1, -2), qg).sum(dim=1) * scale
        dvg = torch.matmul(p.transpose(-1, -2), dog).sum(dim=1)
        dk[ks] = dkg.permute(1, 0, 2).to(k.dtype)
        dv[ks] = dvg.permute(1, 0, 2).to(v.dtype)
    return dq, dk, dv
