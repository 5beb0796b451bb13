"""Document-masked attention for packed batches: one varlen kernel call at cp = 1, all-gather K/V
over the cp ranks otherwise (Llama 3 paper §3.3.2).

Each cp rank holds some runs of every document (document_sharding.py: zigzag within each
document by default, so every rank does the same causal work). A run's queries need the keys from
their document's start up to themselves, which may live on any rank. Rather than passing K/V
around a ring (where the document mask would have to be re-cut at every step), each rank
all-gathers K/V and runs one varlen attention of its runs against exactly the keys they need.
Under GQA only the KV heads travel (Llama 3 8B: 8 of 32 heads), and `heads_k_stride` gathers them
a few heads at a time, the next group's all-gather in flight while the current group computes.

The backward re-gathers K/V the same way (nothing gathered is kept for it), computes dq locally,
and returns each key's gradient to the rank that owns the key with one all-to-all per head group:
a rank sends, in fp32, only the keys its queries touched, each summed once, and the owner adds up
what it receives; the all-to-all of one group overlaps the next group's compute. docs/packing.md
explains the choices.
"""

import weakref
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from titan_cp.context_parallel.document_sharding import PackedShards
from titan_cp.context_parallel.kernels import AttentionKernel
from titan_cp.context_parallel.ring_flash_attn_adapter import ring_flash_attn_module
from titan_cp.context_parallel.varlen_kernels import VarlenSegments

# torch 2.13 renamed the tensor-in/tensor-out all-gather (`all_gather_single`); older releases
# (the GPU machines run 2.11) only have the `*_tensor` name. Same semantics.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
    shards: PackedShards,
    cp_group: Optional[dist.ProcessGroup],
    heads_k_stride: int,
    kernel: AttentionKernel,
) -> Tensor:
    """Document-masked causal attention of this rank's shard of a packed batch.

    `heads_k_stride` KV heads are gathered at a time; 0 gathers all of them at once. Otherwise it
    must divide the KV heads: `ContextParallel.validate` checks it once, before training.

    q `[B, L, Hq, D]`, k/v `[B, L, Hkv, D]`: this rank's tokens in `shards`' local order;
    cp_group None means cp = 1. Returns `[B, L, Hq, D]` in q's dtype.
    """
    n_kv = k.shape[2]
    heads_k_stride = heads_k_stride or n_kv
    if q.shape[2] % n_kv:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {n_kv} KV heads")
    cp, rank = (1, 0) if cp_group is None else (dist.get_world_size(cp_group), dist.get_rank(cp_group))
    if cp != shards.cp or q.shape[:2] != shards.token_index.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)} is not a shard of {shards.batch}x{shards.seq_len} tokens over cp={cp}")
    if cp == 1:
        segments = _cached(shards, ("segments", str(q.device)), lambda: _local_segments(shards, q.device))
        return _LocalVarlenAttention.apply(q, k, v, segments, kernel)
    if kernel.name == "flash_attn":
        return _ring_flash_attn_llama3(q, k, v, shards, cp_group, heads_k_stride)
    plan = _cached(shards, ("plan", rank, str(q.device)), lambda: _build_plan(shards, rank, q.device))
    return _AllGatherKVAttention.apply(q, k, v, plan, cp_group, heads_k_stride, kernel)


# Plans are built on the host once per batch and reused by every layer; they hang off the
# batch's PackedShards (made fresh by ContextParallel.shard for each batch) and die with it.
_plans: "weakref.WeakKeyDictionary[PackedShards, dict]" = weakref.WeakKeyDictionary()


def _cached(shards: PackedShards, key: tuple, build):
    per_batch = _plans.setdefault(shards, {})
    if key not in per_batch:
        per_batch[key] = build()
    return per_batch[key]


# --- cp = 1: the documents themselves are the segments -------------------------------------------


def _local_segments(shards: PackedShards, device: torch.device) -> VarlenSegments:
    bounds = [0]
    for _, _, a, e in shards.runs[0]:
        bounds.append(bounds[-1] + e - a)
    return VarlenSegments.from_bounds(bounds, bounds, device)


class _LocalVarlenAttention(torch.autograd.Function):
    """All heads in one kernel call: nothing is gathered, so heads_k_stride has nothing to bound."""

    @staticmethod
    def forward(ctx, q, k, v, segments: VarlenSegments, kernel: AttentionKernel):
        scale = q.shape[-1] ** -0.5
        qf, kf, vf = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
        out, lse = kernel.varlen_forward(qf, kf, vf, segments, scale)
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.args = (segments, kernel, scale, q.shape, k.shape)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, out, lse = ctx.saved_tensors
        segments, kernel, scale, q_shape, k_shape = ctx.args
        dq, dk, dv = kernel.varlen_backward(dout.reshape(qf.shape), qf, kf, vf, out, lse, segments, scale)
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), None, None


# --- cp > 1: all-gather K/V ------------------------------------------------------------------


@dataclass(frozen=True)
class _GatherPlan:
    """What one rank computes and where its key gradients go.

    The gathered buffer of one head group is `[cp, 2, B*L, heads, D]` (rank-major, K then V);
    `kv_rows` indexes its first three dimensions flattened: the keys in segment order, padded to
    `n_padded`, then the values the same way. Padding rows (copies of row 0, outside every
    segment) round the key count up so that consecutive batches present the same shapes to the
    kernels (cuDNN builds a graph per shape).

    Backward: a document's runs on one rank all start their keys at the document start, so the
    run reaching furthest (*primary*) covers every key the rank touches in that document; the
    other runs' keys (*secondary*, zigzag's head chunk) are added onto those. `send_keys[i]` is
    the primary key of send slot i (slots ordered by owner rank, then owner row);
    `send_counts[j]` slots go to rank j; rank j sends back `recv_rows[j]` (local rows).
    """

    segments: VarlenSegments
    kv_rows: Tensor
    n_keys: int
    n_padded: int
    send_keys: Tensor
    secondary_keys: Tensor
    secondary_slots: Tensor
    send_counts: list[int]
    recv_rows: list[Tensor]


def _owners(shards: PackedShards) -> tuple[Tensor, Tensor]:
    """For each flattened token b*S + p: the rank that holds it and its row in that rank's `[B*L]`."""
    batch, seq = shards.batch, shards.seq_len
    owner = torch.empty(batch * seq, dtype=torch.int64)
    row = torch.empty(batch * seq, dtype=torch.int64)
    local_rows = torch.arange(shards.token_index[0].numel())
    for rank in range(shards.cp):
        flat = (shards.token_index[rank] + torch.arange(batch).unsqueeze(1) * seq).reshape(-1)
        owner[flat] = rank
        row[flat] = local_rows
    return owner, row


def _touched(shards: PackedShards, rank: int) -> dict[tuple[int, int], int]:
    """(sample, document start) -> the end of the furthest run of that document on `rank`."""
    reach: dict[tuple[int, int], int] = {}
    for b, s, _, e in shards.runs[rank]:
        reach[b, s] = max(reach.get((b, s), 0), e)
    return reach


def _touched_tokens(shards: PackedShards, rank: int) -> Tensor:
    seq = shards.seq_len
    spans = [torch.arange(b * seq + s, b * seq + e) for (b, s), e in _touched(shards, rank).items()]
    return torch.cat(spans)


def _bucket(n: int, total: int) -> int:
    """n rounded up to a multiple of total/16 (at least 64 rows)."""
    step = max(64, -(-total // 16))
    return -(-n // step) * step


def _build_plan(shards: PackedShards, rank: int, device: torch.device) -> _GatherPlan:
    seq, cp = shards.seq_len, shards.cp
    tokens = shards.token_index[0].numel()  # B*L
    owner, row = _owners(shards)
    reach = _touched(shards, rank)

    q_bounds, k_bounds, keys = [0], [0], []
    primary_keys, primary_tokens, secondary_keys, secondary_tokens = [], [], [], []
    for b, s, a, e in shards.runs[rank]:
        first_key = k_bounds[-1]
        q_bounds.append(q_bounds[-1] + e - a)
        k_bounds.append(first_key + e - s)
        span = torch.arange(b * seq + s, b * seq + e)
        keys.append(span)
        key_ids = torch.arange(first_key, first_key + e - s)
        if reach.get((b, s)) == e:
            del reach[b, s]  # one primary run per document
            primary_keys.append(key_ids)
            primary_tokens.append(span)
        else:
            secondary_keys.append(key_ids)
            secondary_tokens.append(span)
    key_tokens = torch.cat(keys)
    n_keys = len(key_tokens)
    n_padded = _bucket(n_keys, 2 * cp * tokens)
    k_rows = torch.cat([owner[key_tokens] * 2 * tokens + row[key_tokens], torch.zeros(n_padded - n_keys, dtype=torch.int64)])

    touched = torch.cat(primary_tokens)
    order = torch.argsort(owner[touched] * tokens + row[touched])
    slot_of_token = torch.empty(shards.batch * seq, dtype=torch.int64)
    slot_of_token[touched[order]] = torch.arange(len(touched))
    secondary = torch.cat(secondary_tokens) if secondary_tokens else torch.empty(0, dtype=torch.int64)

    recv_rows = []
    for source in range(cp):
        theirs = touched if source == rank else _touched_tokens(shards, source)
        recv_rows.append(torch.sort(row[theirs[owner[theirs] == rank]]).values.to(device))
    return _GatherPlan(
        segments=VarlenSegments.from_bounds(q_bounds, k_bounds, device),
        kv_rows=torch.cat([k_rows, k_rows + tokens]).to(device),
        n_keys=n_keys,
        n_padded=n_padded,
        send_keys=torch.cat(primary_keys)[order].to(device),
        secondary_keys=(torch.cat(secondary_keys) if secondary_keys else secondary).to(device),
        secondary_slots=slot_of_token[secondary].to(device),
        send_counts=torch.bincount(owner[touched], minlength=cp).tolist(),
        recv_rows=recv_rows,
    )


def _launch_gather(
    k: Tensor, v: Tensor, heads: slice, group: dist.ProcessGroup
) -> tuple[Tensor, dist.Work]:
    """Start gathering one group of KV heads into a `[cp * 2 * B*L, h, D]` buffer (rank-major,
    K then V per rank); returns the buffer and the pending work."""
    local = torch.stack([k[:, heads], v[:, heads]])
    gathered = local.new_empty((dist.get_world_size(group) * 2,) + tuple(local.shape[1:]))
    work = _all_gather(gathered, local, group=group, async_op=True)
    return gathered.view(-1, *local.shape[2:]), work


def _gathered_kv(
    k: Tensor, v: Tensor, plan: _GatherPlan, group: dist.ProcessGroup, stride: int
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Yield (KV head slice, K rows, V rows) per head group, the next group's gather in flight."""
    groups = [slice(h, h + stride) for h in range(0, k.shape[1], stride)]
    pending = _launch_gather(k, v, groups[0], group)
    for i, heads in enumerate(groups):
        gathered, work = pending
        work.wait()
        if i + 1 < len(groups):
            pending = _launch_gather(k, v, groups[i + 1], group)
        rows = gathered.index_select(0, plan.kv_rows)
        yield heads, rows[: plan.n_padded], rows[plan.n_padded :]


def _query_heads(kv_heads: slice, n_rep: int) -> slice:
    """Query heads served by a slice of KV heads (query head h uses KV head h // n_rep)."""
    return slice(kv_heads.start * n_rep, kv_heads.stop * n_rep)


class _AllGatherKVAttention(torch.autograd.Function):
    """Forward: gather K/V per head group, varlen attention of the local queries. Backward:
    re-gather, local dq, all-to-all of the fp32 key gradients to their owners."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _GatherPlan, group, heads_k_stride: int, kernel: AttentionKernel):
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
            out[:, qh], lse[qh] = kernel.varlen_forward(qf[:, qh], k_rows, v_rows, plan.segments, scale)
        ctx.save_for_backward(qf, kf, vf, out, lse)
        ctx.args = (plan, group, heads_k_stride, kernel, scale, q.shape, k.shape)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, out, lse = ctx.saved_tensors
        plan, group, stride, kernel, scale, q_shape, k_shape = ctx.args
        n_q, n_kv = qf.shape[1], kf.shape[1]
        dout = dout.reshape(qf.shape)
        dq = torch.empty_like(qf)
        dk = torch.empty_like(kf)
        dv = torch.empty_like(vf)
        in_flight = None
        for heads, k_rows, v_rows in _gathered_kv(kf, vf, plan, group, stride):
            qh = _query_heads(heads, n_q // n_kv)
            dq[:, qh], dk_rows, dv_rows = kernel.varlen_backward(
                dout[:, qh], qf[:, qh], k_rows, v_rows, out[:, qh], lse[qh], plan.segments, scale
            )
            # One group's all-to-all overlaps the next group's compute; finishing the previous
            # one first keeps at most two groups' gradient buffers alive.
            pending = _launch_return(dk_rows, dv_rows, plan, heads, group)
            if in_flight is not None:
                _finish_return(in_flight, plan, dk, dv)
            in_flight = pending
        _finish_return(in_flight, plan, dk, dv)
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), None, None, None, None


def _launch_return(
    dk_rows: Tensor, dv_rows: Tensor, plan: _GatherPlan, heads: slice, group: dist.ProcessGroup
) -> tuple[slice, Tensor, dist.Work]:
    """Send one head group's key gradients, summed per touched key in fp32, to their owners."""
    send = torch.stack([dk_rows.index_select(0, plan.send_keys), dv_rows.index_select(0, plan.send_keys)], 1).float()
    if plan.secondary_keys.numel():
        extra = torch.stack([dk_rows.index_select(0, plan.secondary_keys), dv_rows.index_select(0, plan.secondary_keys)], 1)
        send.index_add_(0, plan.secondary_slots, extra.float())
    recv_counts = [len(rows) for rows in plan.recv_rows]
    received = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    work = dist.all_to_all_single(received, send, recv_counts, plan.send_counts, group=group, async_op=True)
    return heads, received, work


def _finish_return(in_flight: tuple[slice, Tensor, dist.Work], plan: _GatherPlan, dk: Tensor, dv: Tensor) -> None:
    """Wait for one head group's all-to-all, add up every sender's part in fp32, store the rows."""
    heads, received, work = in_flight
    work.wait()
    total = received.new_zeros((dk.shape[0],) + tuple(received.shape[1:]))
    start = 0
    for rows in plan.recv_rows:  # rows are distinct within one sender
        total.index_add_(0, rows, received[start : start + len(rows)])
        start += len(rows)
    dk[:, heads] = total[:, 0].to(dk.dtype)
    dv[:, heads] = total[:, 1].to(dv.dtype)


# --- kernel 'flash_attn' with cp > 1: ring-flash-attn's own all-gather attention ---------------


def _ring_flash_attn_llama3(
    q: Tensor, k: Tensor, v: Tensor, shards: PackedShards, group: dist.ProcessGroup, heads_k_stride: int
) -> Tensor:
    """ring-flash-attn's `llama3_flash_attn_varlen_func`, one sample at a time.

    It shards one flat token stream contiguously over the ranks (ContextParallel picks the
    contiguous packed layout for it), so each sample is one call with that sample's document
    boundaries (what `llama3_flash_attn_prepare_cu_seqlens` wants).
    """
    if shards.layout != "contiguous":
        raise ValueError("ring-flash-attn's llama3 attention needs the contiguous packed layout")
    llama3 = ring_flash_attn_module("llama3_flash_attn_varlen")
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    per_sample = _cached(shards, ("samples",), lambda: _per_sample_bounds(shards))
    outs = []
    for b in range(q.shape[0]):
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


def _per_sample_bounds(shards: PackedShards) -> list[Tensor]:
    """Each sample's document boundaries, relative to the sample, ending with seq."""
    starts: list[set[int]] = [set() for _ in range(shards.batch)]
    for runs in shards.runs:
        for b, s, _, _ in runs:
            starts[b].add(s)
    return [torch.tensor(sorted(s) + [shards.seq_len], dtype=torch.int32) for s in starts]
