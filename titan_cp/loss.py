"""Cross-entropy over the vocabulary without ever holding all the logits.

At 128K tokens and a 128,256 vocabulary, fp32 logits alone are 64 GB (docs/memory.md). The output projection and the loss therefore run chunk by chunk, and each chunk
is wrapped in non-reentrant activation checkpointing: its logits are dropped after the forward
and recomputed in the backward, so at most one chunk's logits exist at any moment.
"""

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(output: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Projection + fp32 cross entropy for one chunk of tokens, summed."""
    logits = output(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


@cache
def _compiled_chunk_loss_sum():
    """`_chunk_loss_sum` through torch.compile. Eager, the fp32 copy of a chunk's logits, the
    log-softmax and its backward are separate passes over [chunk, vocab] fp32 tensors (6% of a
    1B step at 64K tokens on an H200); compiled, they fuse into reductions that read the bf16
    logits once and write their gradient once."""
    return torch.compile(_chunk_loss_sum)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, output: nn.Module, labels: torch.Tensor, chunk_size: int, compiled: bool = False
) -> torch.Tensor:
    """Sum of token cross-entropies of `output(hidden)` against `labels` (-100 ignored), in fp32.

    hidden `[B, S, dim]`, labels `[B, S]`; `chunk_size` tokens per chunk, 0 for one chunk.
    The sum (not the mean) lets the trainer divide by the token count of the whole dp x cp group.
    `compiled` runs each chunk's projection and loss through torch.compile.
    """
    chunk_loss_sum = _compiled_chunk_loss_sum() if compiled else _chunk_loss_sum
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if chunk_size <= 0 or chunk_size >= labels.numel():
        return chunk_loss_sum(output, hidden, labels)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for hidden_chunk, label_chunk in zip(hidden.split(chunk_size), labels.split(chunk_size)):
        total = total + checkpoint(chunk_loss_sum, output, hidden_chunk, label_chunk, use_reentrant=False)
    return total
