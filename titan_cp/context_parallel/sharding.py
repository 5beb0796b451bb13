"""Split [B, S, ...] tensors along the sequence (dim 1) over the cp ranks, and put them back.

Two layouts:
- contiguous: rank r holds `[r*S/cp, (r+1)*S/cp)`. Simple, but under a causal mask the last rank
  does cp times the work of the first.
- zigzag (head-tail): the sequence is cut into 2*cp chunks and rank r holds chunks r and
  2*cp-1-r, so every rank gets one early and one late chunk and the causal work is balanced.
"""

from typing import Literal

import torch

from titan_cp.errors import UserError

Layout = Literal["zigzag", "contiguous"]

# The config key that chooses the layout, named in error messages.
_LAYOUT_KEY = "parallelism.context_parallel_load_balancer"


def chunks_per_rank(layout: Layout) -> int:
    """How many equal chunks of the sequence each rank holds."""
    return 2 if layout == "zigzag" else 1


def validate_seq_len(seq_len: int, cp: int, layout: Layout) -> None:
    """Raise UserError when `seq_len` cannot be split evenly in `layout` over `cp` ranks."""
    divisor = chunks_per_rank(layout) * cp
    if seq_len % divisor != 0:
        what = f"2*cp = {divisor}" if layout == "zigzag" else f"cp = {divisor}"
        setting = "zigzag" if layout == "zigzag" else "none (contiguous)"
        raise UserError(
            f"training.seq_len {seq_len} must be divisible by {what} for {_LAYOUT_KEY} = {setting}"
        )


def _check_divisible(x: torch.Tensor, cp: int, layout: Layout) -> None:
    divisor = chunks_per_rank(layout) * cp
    if x.dim() < 2 or x.shape[1] % divisor != 0:
        raise ValueError(
            f"{layout} sharding over cp={cp} needs dim 1 divisible by {divisor}, got {tuple(x.shape)}"
        )


def shard(x: torch.Tensor, rank: int, cp: int, layout: Layout) -> torch.Tensor:
    """This rank's part of `x` [B, S, ...] along dim 1 (a new contiguous tensor)."""
    _check_divisible(x, cp, layout)
    if layout == "contiguous":
        return x.chunk(cp, dim=1)[rank].contiguous()
    pieces = x.chunk(2 * cp, dim=1)
    return torch.cat([pieces[rank], pieces[2 * cp - 1 - rank]], dim=1)


def unshard(shards: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """The full tensor from every rank's shard (`shards[r]` from rank r), inverse of `shard`."""
    if layout == "contiguous":
        return torch.cat(shards, dim=1)
    heads = [s.chunk(2, dim=1)[0] for s in shards]
    tails = [s.chunk(2, dim=1)[1] for s in shards]
    return torch.cat(heads + tails[::-1], dim=1)
