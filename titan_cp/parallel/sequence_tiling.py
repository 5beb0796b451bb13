"""Run a position-wise module over chunks of the sequence, so its wide intermediates never exist
for the whole local sequence at once (`training.mlp_chunk_size`).

Run by autograd, the SwiGLU feed-forward keeps four `[S, ffn_dim]` tensors per token for
backward, 3.5x the model width for Llama 3: at a million local tokens that is 64 GiB for the 1B
model's one block being recomputed. A position-wise module gives the same result on any split of
the sequence, so each chunk runs under non-reentrant activation checkpointing: forward keeps only
the chunk's input (a view of the module's input), and backward recomputes one chunk at a time.
The autograd engine runs the nodes of the chunk created last first and finishes a chunk before
the next (it orders ready nodes by creation), so at most one chunk's intermediates are alive in
backward too.
"""

from functools import wraps

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def tile_over_sequence(module: nn.Module, chunk_size: int, seq_dim: int = 1) -> None:
    """Make `module.forward(x)` run over chunks of `chunk_size` tokens along `seq_dim`.

    Only for modules that treat every position independently (the feed-forward); the instance's
    forward is wrapped, so parameter names and state-dict keys do not change. A sequence no
    longer than one chunk runs as before.
    """
    inner = module.forward

    @wraps(inner)
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[seq_dim] <= chunk_size:
            return inner(x)
        chunks = [checkpoint(inner, piece, use_reentrant=False) for piece in x.split(chunk_size, dim=seq_dim)]
        return torch.cat(chunks, dim=seq_dim)

    # Traced by torch.compile, the per-chunk checkpoints would become recompute tags that the
    # graph partitioner may schedule together; run eagerly, they keep the one-chunk bound.
    module.forward = torch.compiler.disable(forward)
