"""All-gather K/V attention for packed documents (Llama 3 paper §3.3.2).

Each cp rank holds a contiguous shard of every sample: rank r has tokens [r·L, (r+1)·L) with
L = S / cp. Its queries need, per document, the keys from the document's start up to themselves,
which may live on lower ranks. Rather than passing K/V around a ring (where a document mask
would have to be re-cut at every step), each rank all-gathers K/V and runs one varlen attention
of its local queries against exactly the prefix they need. Under GQA only the KV heads travel
(Llama 3 8B: 8 of 32 heads), and `heads_k_stride` gathers them a few heads at a time, the next
group's all-gather in flight while the current group computes, to bound the gathered memory.
The backward re-gathers K/V the same way, computes dq locally and reduce-scatters dK/dV in fp32
to the ranks that own those tokens. docs/packing.md explains the choices.
"""

import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from titan_cp.context_parallel.ring_flash_attn_adapter import ring_flash_attn_module
from titan_cp.context_parallel.varlen_kernels import VarlenSegments, varlen_backward, varlen_forward

# torch 2.13 renamed the tensor-in/tensor-out collectives (`*_single`); older releases (the
# GPU machines run 2.11) only have the `*_tensor` names. Same semantics.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def document_cu_seqlens(positions: Tensor) -> Tensor:
    """Document boundaries of a packed batch, as int32 cu_seqlens over the flattened B*S tokens.

    positions `[B, S]` are the full (unsharded) position ids: a document starts where its
    position is 0, and every sample starts a new one (a document cut by the window edge
    continues with a non-zero position, but it must not see the previous sample).
    """
    batch, seq = positions.shape
    starts = positions == 0
    starts[:, 0] = True
    first_tokens = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.tensor([batch * seq], device=positions.device)
    return torch.cat([first_tokens, end]).to(torch.int32)


def varlen_llama3_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    cp_group: Optional[dist.ProcessGroup],
    heads_k_stride: int,
    kernel: str,
) -> Tensor:
    """Document-masked causal attention of this rank's contiguous shard of a packed batch.

    `heads_k_stride` must divide the KV heads: `ContextParallel.validate` checks it once, before
    training (the config checks that it is >= 1).

    q `[B, S/cp, Hq, D]`, k/v `[B, S/cp, Hkv, D]`; cu_seqlens are the global boundaries over the
    flattened full B*S tokens (`document_cu_seqlens`); cp_group None means cp = 1. kernel is a
    name from `kernels.resolve_attn_implementation`. Returns `[B, S/cp, Hq, D]` in q's dtype.
    """
    n_kv = k.shape[2]
    if q.shape[2] % n_kv:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {n_kv} KV heads")
    cp, rank = _group_size_rank(cp_group)
    batch, shard_len = q.shape[:2]
    if kernel == "flash_attn" and cp > 1:
        return _ring_flash_attn_llama3(q, k, v, cu_seqlens, cp_group, heads_k_stride)
    plan = _cached(cu_seqlens, ("plan", batch, shard_len, rank, cp, str(q.device)), _build_plan)
    group = cp_group if cp > 1 else None
    return _AllGatherKVAttention.apply(q, k, v, plan, group, heads_k_stride, kernel)


def _group_size_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


@dataclass(frozen=True)
class _ShardPlan:
    """What one rank computes: its query/key segments and which gathered K/V rows feed them.

    The gathered buffer of one head group is `[cp, 2, B*L, heads, D]` (rank-major, K then V);
    `kv_rows` indexes its first dimension flattened, K rows first then V rows, in segment order.
    """

    segments: VarlenSegments
    kv_rows: Tensor
    n_keys: int


# One plan per batch: every layer calls with the same cu_seqlens tensor, and building a plan
# reads the boundaries on the host. Keyed by the tensor's identity (held weakly): shard() makes
# a fresh cu_seqlens for each batch, and a used one must not be edited in place.
_cache: dict[tuple, tuple] = {}


def _cached(cu_seqlens: Tensor, key: tuple, build: Callable):
    """build(boundaries as ints, *key[1:]) for this cu_seqlens, remembered for the last batch."""
    hit = _cache.get(key[0])
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == key:
        return hit[2]
    value = build(cu_seqlens.tolist(), *key[1:])
    _cache[key[0]] = (weakref.ref(cu_seqlens), key, value)
    return value


def _sample_starts(bounds: list[int], b: int, seq: int) -> list[int]:
    """Document starts within sample b, relative to it (the sample start is always one)."""
    return sorted({0} | {c - b * seq for c in bounds if b * seq < c < (b + 1) * seq})


def _build_plan(
    bounds: list[int], batch: int, shard_len: int, rank: int, cp: int, device: str
) -> _ShardPlan:
    seq = shard_len * cp
    if bounds[0] != 0 or bounds[-1] != batch * seq:
        raise ValueError(
            f"cu_seqlens spans [{bounds[0]}, {bounds[-1]}) but the batch has {batch}x{seq} tokens"
        )
    lo, hi = rank * shard_len, (rank + 1) * shard_len
    q_bounds, k_bounds, key_positions = [0], [0], []
    for b in range(batch):
        starts = _sample_starts(bounds, b, seq)
        # Documents overlapping [lo, hi): the queries are the overlap, the keys run from the
        # document start to the overlap's end, so the last query of a segment meets its last key.
        docs = [(s, e) for s, e in zip(starts, starts[1:] + [seq]) if s < hi and e > lo]
        for start, end in docs:
            q_bounds.append(q_bounds[-1] + min(end, hi) - max(start, lo))
            k_bounds.append(k_bounds[-1] + min(end, hi) - start)
        pos = torch.arange(docs[0][0], hi)
        # Token p of sample b sits on rank p // L at local row b*L + p % L.
        rank_of, row_in_rank = pos // shard_len, b * shard_len + pos % shard_len
        key_positions.append(rank_of * 2 * batch * shard_len + row_in_rank)
    k_rows = torch.cat(key_positions)
    v_rows = k_rows + batch * shard_len
    q_len = [e - s for s, e in zip(q_bounds, q_bounds[1:])]
    k_len = [e - s for s, e in zip(k_bounds, k_bounds[1:])]
    segments = VarlenSegments(
        cu_q=torch.tensor(q_bounds, dtype=torch.int32, device=device),
        cu_k=torch.tensor(k_bounds, dtype=torch.int32, device=device),
        max_q=max(q_len),
        max_k=max(k_len),
        q_bounds=tuple(q_bounds),
        k_bounds=tuple(k_bounds),
    )
    return _ShardPlan(segments, torch.cat([k_rows, v_rows]).to(device), len(k_rows))


def _launch_gather(
    k: Tensor, v: Tensor, heads: slice, group: Optional[dist.ProcessGroup]
) -> tuple[Tensor, Optional[dist.Work]]:
    """Start gathering one group of KV heads into a `[cp * 2, B*L, h, D]` buffer (rank-major,
    K then V per rank); returns the buffer and the pending work."""
    local = torch.stack([k[:, heads], v[:, heads]])
    if group is None:
        return local, None
    gathered = local.new_empty((dist.get_world_size(group) * 2,) + tuple(local.shape[1:]))
    return gathered, _all_gather(gathered, local, group=group, async_op=True)


def _gathered_kv(
    k: Tensor, v: Tensor, plan: _ShardPlan, group: Optional[dist.ProcessGroup], stride: int
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Yield (KV head slice, K rows, V rows) per head group, the next group's gather in flight."""
    n_kv, head_dim = k.shape[1], k.shape[2]
    groups = [slice(h, h + stride) for h in range(0, n_kv, stride)]
    pending = _launch_gather(k, v, groups[0], group)
    for i, heads in enumerate(groups):
        gathered, work = pending
        if work is not None:
            work.wait()
        if i + 1 < len(groups):
            pending = _launch_gather(k, v, groups[i + 1], group)
        rows = gathered.view(-1, stride, head_dim).index_select(0, plan.kv_rows)
        yield heads, rows[: plan.n_keys], rows[plan.n_keys :]


def _query_heads(kv_heads: slice, n_rep: int) -> slice:
    """Query heads served by a slice of KV heads (query head h uses KV head h // n_rep)."""
    return slice(kv_heads.start * n_rep, kv_heads.stop * n_rep)


class _AllGatherKVAttention(torch.autograd.Function):
    """Forward: gather K/V per head group, varlen attention of the local queries. Backward:
    re-gather, local dq, reduce-scatter fp32 dK/dV to their owners."""

    @staticmethod
    def forward(ctx, q, k, v, plan, group, heads_k_stride, kernel):
        batch, shard_len, n_q, head_dim = q.shape
        n_kv = k.shape[2]
        scale = head_dim**-0.5
        qf = q.reshape(batch * shard_len, n_q, head_dim)
        kf = k.reshape(batch * shard_len, n_kv, head_dim)
        vf = v.reshape(batch * shard_len, n_kv, head_dim)
        out = torch.empty_like(qf)
        lse = torch.empty(n_q, batch * shard_len, dtype=torch.float32, device=q.device)
        for heads, k_rows, v_rows in _gathered_kv(kf, vf, plan, group, heads_k_stride):
            qh = _query_heads(heads, n_q // n_kv)
            out[:, qh], lse[qh] = varlen_forward(
                qf[:, qh], k_rows, v_rows, plan.segments, scale, kernel
            )
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.args = (plan, group, heads_k_stride, kernel, scale, q.shape)
        ctx.k_shape = k.shape
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, out, lse = ctx.saved_tensors
        plan, group, stride, kernel, scale, q_shape = ctx.args
        n_q, n_kv = qf.shape[1], kf.shape[1]
        dout = dout.reshape(qf.shape)
        dq = torch.empty_like(qf)
        dk = torch.empty_like(kf)
        dv = torch.empty_like(vf)
        in_flight = None
        for heads, k_rows, v_rows in _gathered_kv(kf, vf, plan, group, stride):
            qh = _query_heads(heads, n_q // n_kv)
            dq[:, qh], dk_rows, dv_rows = varlen_backward(
                dout[:, qh], qf[:, qh], k_rows, v_rows, out[:, qh], lse[qh], plan.segments,
                scale, kernel,
            )  # fmt: skip
            # One group's reduce-scatter overlaps the next group's compute; waiting for the
            # previous one first keeps at most two fp32 gradient buffers alive.
            pending = _launch_reduce(dk_rows, dv_rows, plan, heads, kf, group)
            if in_flight is not None:
                _finish_reduce(in_flight, dk, dv)
            in_flight = pending
        _finish_reduce(in_flight, dk, dv)
        return dq.view(q_shape), dk.view(ctx.k_shape), dv.view(ctx.k_shape), None, None, None, None


def _launch_reduce(
    dk_rows: Tensor, dv_rows: Tensor, plan: _ShardPlan, heads: slice, kf: Tensor,
    group: Optional[dist.ProcessGroup],
) -> tuple[slice, Tensor, Optional[dist.Work]]:
    """Sum one head group's dK/dV onto the ranks that own the tokens, in fp32.

    The row gradients go back into the gathered layout `[cp, 2, B*L]` (zero where no local
    query looked), so a reduce-scatter over the first dimension lands each rank's own rows.
    """
    cp = 1 if group is None else dist.get_world_size(group)
    tokens = kf.shape[0]
    full = torch.zeros(
        (cp * 2 * tokens,) + tuple(dk_rows.shape[1:]), dtype=torch.float32, device=kf.device
    )
    full.index_copy_(0, plan.kv_rows, torch.cat([dk_rows, dv_rows]).float())
    if group is None:
        return heads, full, None
    mine = full.new_empty((2 * tokens,) + tuple(full.shape[1:]))
    return heads, mine, _reduce_scatter(mine, full, group=group, async_op=True)


def _finish_reduce(
    in_flight: tuple[slice, Tensor, Optional[dist.Work]], dk: Tensor, dv: Tensor
) -> None:
    """Wait for one head group's reduce-scatter and store its rows in q/k's dtype."""
    heads, mine, work = in_flight
    if work is not None:
        work.wait()
    tokens = dk.shape[0]
    dk[:, heads] = mine[:tokens].to(dk.dtype)
    dv[:, heads] = mine[tokens:].to(dv.dtype)


# --- kernel 'flash_attn' with cp > 1: ring-flash-attn's own all-gather attention ---------------


def _ring_flash_attn_llama3(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    group: dist.ProcessGroup,
    heads_k_stride: int,
) -> Tensor:
    """ring-flash-attn's `llama3_flash_attn_varlen_func`, one sample at a time.

    It shards one flat token stream contiguously over the ranks, while titan_cp shards every
    sample; per sample the two layouts agree, so each sample is one call with that sample's
    global boundaries (what `llama3_flash_attn_prepare_cu_seqlens` wants).
    """
    llama3 = ring_flash_attn_module("llama3_flash_attn_varlen")
    batch, shard_len = q.shape[:2]
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    seq = shard_len * cp
    per_sample = _cached(cu_seqlens, ("samples", batch, seq), _per_sample_bounds)
    outs = []
    for b in range(batch):
        cu_q, cu_k, max_q, max_k, k_slice = llama3.llama3_flash_attn_prepare_cu_seqlens(
            per_sample[b].to(q.device), causal=True, rank=rank, world_size=cp
        )
        outs.append(
            llama3.llama3_flash_attn_varlen_func(
                q[b], k[b], v[b], cu_q, cu_k, max_q, max_k, heads_k_stride, k_slice,
                causal=True, group=group,
            )  # fmt: skip
        )
    return torch.stack(outs)


def _per_sample_bounds(bounds: list[int], batch: int, seq: int) -> list[Tensor]:
    """Each sample's document boundaries, relative to the sample, ending with seq."""
    return [
        torch.tensor(_sample_starts(bounds, b, seq) + [seq], dtype=torch.int32)
        for b in range(batch)
    ]
