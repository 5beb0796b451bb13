"""flash-attn 2.7's private FA2 functions, re-implemented with torch math for CPU tests.

Only what ring-flash-attn 0.1.8 and titan_cp call is here: `_flash_attn_forward/_backward` on
`[B, S, H, D]` and `_flash_attn_varlen_forward/_backward` on `[total, H, D]` with cu_seqlens.
Signatures and return values follow flash-attn 2.7: forwards return
`(out, softmax_lse, S_dmask, rng_state)`, LSE is fp32 `[B, H, S_q]` (varlen: `[H, total_q]`),
backwards write dq/dk/dv in place and return the softmax row sums `D`. The causal mask is
aligned to the bottom-right corner when S_q != S_k, as in flash-attn >= 2.1. A row with no
visible key gets out 0 and LSE +inf, as FA2 does. Unlike flash-attn it also accepts fp32 (it
computes in fp32 whatever the input), so tests can compare at fp32 precision. Dropout, windows,
softcap and ALiBi are not needed by the tests and are refused.
"""

import torch


def _refuse_unsupported(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes) -> None:
    if dropout_p or (window_size_left, window_size_right) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("the flash_attn test double supports no dropout, window, softcap or ALiBi")


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Masked fp32 scores [H, S_q, S_k] for one sequence, q [S_q, Hq, D], k [S_k, Hkv, D]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        s_q, s_k = q.shape[0], k.shape[0]
        rows = torch.arange(s_q).unsqueeze(1)
        cols = torch.arange(s_k).unsqueeze(0)
        s = s.masked_fill(cols > rows + (s_k - s_q), float("-inf"))
    return s


def _fwd_one(q, k, v, scale, causal):
    """(out [S_q, Hq, D] fp32, lse [Hq, S_q] fp32) for one sequence."""
    s = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(s - lse.unsqueeze(-1))
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).float()
    return torch.einsum("hqk,khd->qhd", p, v), lse


def _bwd_one(dout, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv, D) in fp32 for one sequence; dk/dv summed back to the KV heads."""
    group = q.shape[1] // k.shape[1]
    p = torch.exp(_scores(q, k, scale, causal) - lse.float().unsqueeze(-1))
    dout, out = dout.float(), out.float()
    v_rep = v.repeat_interleave(group, dim=1).float()
    k_rep = k.repeat_interleave(group, dim=1).float()
    d = (dout * out).sum(-1).transpose(0, 1)  # [H, S_q]
    dv = torch.einsum("hqk,qhd->khd", p, dout)
    dp = torch.einsum("qhd,khd->hqk", dout, v_rep)
    ds = p * (dp - d.unsqueeze(-1))
    dq = torch.einsum("hqk,khd->qhd", ds, k_rep) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, q.float()) * scale

    def reduce(x):
        return x.view(x.shape[0], k.shape[1], group, x.shape[-1]).sum(2)

    return dq, reduce(dk), reduce(dv), d


def _flash_attn_forward(
    q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
    softcap=0.0, alibi_slopes=None, return_softmax=False,
):  # fmt: skip
    _refuse_unsupported(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    outs, lses = zip(*(_fwd_one(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])))
    return torch.stack(outs).to(q.dtype), torch.stack(lses), None, None


def _flash_attn_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
    window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
    deterministic=False, rng_state=None,
):  # fmt: skip
    _refuse_unsupported(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    ds = []
    for b in range(q.shape[0]):
        dq_b, dk_b, dv_b, d_b = _bwd_one(
            dout[b], q[b], k[b], v[b], out[b], softmax_lse[b], softmax_scale, causal
        )
        dq[b].copy_(dq_b)
        dk[b].copy_(dk_b)
        dv[b].copy_(dv_b)
        ds.append(d_b)
    return torch.stack(ds)


def _flash_attn_varlen_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
    causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
    return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None,
):  # fmt: skip
    _refuse_unsupported(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    if block_table is not None or leftpad_k is not None or seqused_k is not None:
        raise NotImplementedError("the flash_attn test double supports no paged or padded K/V")
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"))
    for (q0, q1), (k0, k1) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        out[q0:q1], lse[:, q0:q1] = _fwd_one(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal)
    return out.to(q.dtype), lse, None, None


def _flash_attn_varlen_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
    softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None, zero_tensors=False,
):  # fmt: skip
    _refuse_unsupported(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    d = torch.zeros(q.shape[1], q.shape[0])
    dq.zero_()
    dk.zero_()
    dv.zero_()
    for (q0, q1), (k0, k1) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        dq_s, dk_s, dv_s, d_s = _bwd_one(
            dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], softmax_lse[:, q0:q1],
            softmax_scale, causal,
        )  # fmt: skip
        dq[q0:q1].copy_(dq_s)
        dk[k0:k1].copy_(dk_s)
        dv[k0:k1].copy_(dv_s)
        d[:, q0:q1] = d_s
    return d


def _spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))
