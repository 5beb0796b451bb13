"""Ulysses context parallelism: split attention by heads with all-to-all (DeepSpeed-Ulysses).

The ranks of a Ulysses group each hold a contiguous part of the sequence for all heads. One
all-to-all turns that into the whole (group's) sequence for 1/u of the heads; attention then
runs on whole sequences, and a second all-to-all brings the output back to sequence shards.
Each all-to-all moves about S·H·D/u elements per rank whatever u is, and packed documents stay
whole on every rank, so the local varlen kernel needs no document split.

In a hybrid (cp = ring × u) the tensors after the all-to-all are this ring rank's shard, and the
ring or all-gather attention runs across the ring ranks on 1/u of the heads.

q, k and v travel in one all-to-all (one buffer, one latency), and so do their gradients. Only
the KV heads travel: a rank receives the KV heads its query heads use. When u does not divide
the KV heads (Llama 3 8B: 8 KV heads, u = 16), each KV head is sent as `kv_copies` replicas, the
fewest that give every rank whole KV heads; the replicas' gradients are summed on the way back.
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

from titan_cp.errors import UserError

_KEY = "parallelism.context_parallel_ulysses_degree"


def kv_copies(ulysses: int, n_kv_heads: int) -> int:
    """Replicas of each KV head the all-to-all must send so every rank gets whole KV heads.

    1 when u divides the KV heads. Otherwise u / gcd(u, Hkv): with Hkv·copies divisible by u,
    and u dividing the query heads, each rank's block of query heads maps onto its own block of
    (replicated) KV heads.
    """
    return ulysses // math.gcd(ulysses, n_kv_heads)


def validate_ulysses(ulysses: int, n_heads: int, n_kv_heads: int) -> str:
    """Raise UserError when the heads cannot be split u ways; return a line for the startup log."""
    if n_heads % ulysses:
        raise UserError(
            f"{_KEY} = {ulysses} must divide the model's {n_heads} query heads"
            " (each rank attends with n_heads / ulysses of them)"
        )
    copies = kv_copies(ulysses, n_kv_heads)
    local_kv = n_kv_heads * copies // ulysses
    if copies == 1:
        return f"ulysses {ulysses}: {n_heads // ulysses} query / {local_kv} KV heads per rank, KV heads not repeated"
    return (
        f"ulysses {ulysses} > {n_kv_heads} KV heads: each KV head replicated {copies}x before the"
        f" all-to-all, {n_heads // ulysses} query / {local_kv} KV heads per rank"
    )


def _seq_to_heads(tensors: list[Tensor], group: dist.ProcessGroup) -> list[Tensor]:
    """Each `[B, L, H_i, D]` -> `[B, u·L, H_i/u, D]`: the group's sequence, this rank's heads."""
    u = dist.get_world_size(group)
    batch, length, _, dim = tensors[0].shape
    # send[i]: this rank's tokens, the i-th block of heads of every tensor (for rank i).
    send = torch.cat([t.reshape(batch, length, u, t.shape[2] // u, dim).permute(2, 0, 1, 3, 4) for t in tensors], 3)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j]: rank j's tokens, this rank's heads; the ranks' token blocks follow one another.
    return [
        part.permute(1, 0, 2, 3, 4).reshape(batch, u * length, part.shape[3], dim)
        for part in recv.split([t.shape[2] // u for t in tensors], dim=3)
    ]


def _heads_to_seq(tensors: list[Tensor], group: dist.ProcessGroup) -> list[Tensor]:
    """Inverse of `_seq_to_heads`: each `[B, u·L, h_i, D]` -> `[B, L, u·h_i, D]`."""
    u = dist.get_world_size(group)
    batch, full_length, _, dim = tensors[0].shape
    length = full_length // u
    # send[i]: the i-th block of tokens (rank i's), this rank's heads.
    send = torch.cat([t.reshape(batch, u, length, t.shape[2], dim).transpose(0, 1) for t in tensors], 3)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j]: this rank's tokens, rank j's heads; head blocks follow one another.
    return [
        part.permute(1, 2, 0, 3, 4).reshape(batch, length, u * part.shape[3], dim)
        for part in recv.split([t.shape[2] for t in tensors], dim=3)
    ]


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(_seq_to_heads(list(tensors), group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_heads_to_seq(list(grads), ctx.group))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, tensor):
        ctx.group = group
        return _heads_to_seq([tensor], group)[0]

    @staticmethod
    def backward(ctx, grad):
        return None, _seq_to_heads([grad], ctx.group)[0]


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, attention) -> Tensor:
    """`attention` run on whole (ring-shard) sequences for this rank's heads.

    q `[B, L, Hq, D]`, k/v `[B, L, Hkv, D]` are this rank's contiguous part of its ring shard;
    `attention(q, k, v)` gets `[B, u·L, Hq/u, D]` and `[B, u·L, Hkv·copies/u, D]` and returns
    the output for those heads, which comes back as `[B, L, Hq, D]`.
    """
    copies = kv_copies(dist.get_world_size(group), k.shape[2])
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
    q, k, v = _SeqToHeads.apply(group, q, k, v)
    return _HeadsToSeq.apply(group, attention(q, k, v))
