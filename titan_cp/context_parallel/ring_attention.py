"""Causal ring attention over the cp ranks (point-to-point, zigzag or contiguous layout).

Each rank keeps its queries and passes its K/V block around the ring: at step i it holds the
block of rank `(rank - i) % cp`. The exchange for step i+1 is posted (`batch_isend_irecv`) before
step i is computed, so communication overlaps compute. Only the KV heads travel; kernels repeat
them locally when they need to (GQA).

Which part of a block is visible follows from the layout and the source rank:
- zigzag (rank r holds chunks r and 2cp-1-r): step 0 is causal over the local block; a lower
  source rank -> all local queries see the first half of its block; a higher one -> only the
  second half of the local queries sees all of it. Every step does the same amount of work.
- contiguous: same rank -> causal; lower -> everything; higher -> nothing.

Partial results merge through their LSE in fp32 (stable form of the softmax-weighted average):
`out <- lerp(out, out_b, sigmoid(lse_b - lse))`, `lse <- lse - logsigmoid(lse - lse_b)`; `lerp_`
does the output update in one pass over the fp32 accumulator.
The backward pass runs every block's kernel backward against the final merged out/LSE, and sends
the block's dK/dV around the ring one step behind its K/V, so it arrives home at the end.
Each rank adds its contribution straight into the buffer it received. The last hop, the one no
compute hides, travels in the input dtype: its receiver would round the fp32 sum to that dtype
anyway, so rounding before sending gives the same bits for half the bytes.

Gradients accumulate in fp32 only where it changes the result. Over two ranks every dQ and
dK/dV element is the sum of at most two kernel outputs, and an elementwise add of two bf16/fp16
tensors already computes in fp32 and rounds once, which gives exactly the bits of an fp32 sum
rounded at the end; so with cp = 2 the accumulators stay in the input dtype (no conversions,
half the bytes on the ring), and from cp = 3 on they are fp32.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_cp.context_parallel.kernels import AttentionKernel
from titan_cp.context_parallel.sharding import Layout

_ALL = slice(None)


class _Ring:
    """Send to the next rank and receive from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Post the exchange of `send`; returns the receive buffer and the requests to wait on.

        `send` must stay untouched until the requests complete.
        """
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, group=self.group),
            dist.P2POp(dist.irecv, recv, self.prev, group=self.group),
        ]
        return recv, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _block_plan(step: int, rank: int, source: int, layout: Layout, seq_len: int):
    """(query slice, key slice, causal) for the block from `source`, or None to skip it."""
    half = seq_len // 2
    if step == 0:
        return _ALL, _ALL, True
    if layout == "zigzag":
        if source < rank:
            return _ALL, slice(0, half), False
        return slice(half, None), _ALL, False
    return (_ALL, _ALL, False) if source < rank else None


def _merge(out, lse, block_out, block_lse, rows: slice) -> None:
    """Merge one block's (out, lse) into the fp32 accumulators for query rows `rows`, in place."""
    acc_out, acc_lse = out[:, rows], lse[:, :, rows]
    weight = torch.sigmoid(block_lse - acc_lse).transpose(1, 2).unsqueeze(-1)
    acc_out.lerp_(block_out.float(), weight)
    acc_lse.sub_(F.logsigmoid(acc_lse - block_lse))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, layout: Layout, kernel: AttentionKernel):
        ring = _Ring(group)
        seq_len = q.shape[1]
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(ring.size):
            if step + 1 < ring.size:
                next_kv, requests = ring.exchange(kv)
            plan = _block_plan(step, ring.rank, (ring.rank - step) % ring.size, layout, seq_len)
            if plan is not None:
                rows, cols, causal = plan
                block_out, block_lse = kernel.forward(q[:, rows], kv[0][:, cols], kv[1][:, cols], causal)
                if out is None:
                    out, lse = block_out.float().contiguous(), block_lse.contiguous()
                else:
                    _merge(out, lse, block_out, block_lse, rows)
            if step + 1 < ring.size:
                _wait(requests)
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.layout, ctx.kernel = group, layout, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        seq_len = q.shape[1]
        kv = torch.stack([k, v])
        accumulate = q.dtype if ring.size <= 2 else torch.float32
        dq = dkv = None
        dkv_requests: list = []
        for step in range(ring.size):
            last = step + 1 == ring.size
            if not last:
                next_kv, kv_requests = ring.exchange(kv)
            plan = _block_plan(step, ring.rank, (ring.rank - step) % ring.size, ctx.layout, seq_len)
            dk_b = dv_b = None
            if plan is not None:
                rows, cols, causal = plan
                dq_b, dk_b, dv_b = ctx.kernel.backward(
                    dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                    out[:, rows], lse[:, :, rows], causal,
                )  # fmt: skip
                if dq is None:  # step 0 covers every local query
                    dq = dq_b.to(accumulate)
                else:
                    dq[:, rows] += dq_b
            if step == 0:  # the local block, whole: its gradient starts here
                dkv = torch.empty(kv.shape, dtype=accumulate, device=kv.device)
                dkv[0].copy_(dk_b)
                dkv[1].copy_(dv_b)
            else:
                # The block's gradient so far arrives from the rank that held it one step earlier.
                _wait(dkv_requests)
                dkv = dkv_in
                if dk_b is not None:
                    dkv[0][:, cols] += dk_b
                    dkv[1][:, cols] += dv_b
            if ring.size > 1:
                send = dkv.to(k.dtype) if last else dkv  # kept alive until the requests complete
                dkv_in, dkv_requests = ring.exchange(send)
            if not last:
                _wait(kv_requests)
                kv = next_kv
        if ring.size > 1:
            _wait(dkv_requests)
            dkv = dkv_in
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp_group: dist.ProcessGroup,
    layout: Layout,
    kernel: AttentionKernel,
    return_lse: bool = False,
):
    """Causal attention of this rank's queries over the whole sequence held by `cp_group`.

    q `[B, S/cp, Hq, D]`, k/v `[B, S/cp, Hkv, D]` are this rank's shards in `layout`; returns
    out `[B, S/cp, Hq, D]` (and the fp32 LSE `[B, Hq, S/cp]` if `return_lse`).
    """
    out, lse = _RingAttention.apply(q, k, v, cp_group, layout, kernel)
    return (out, lse) if return_lse else out
