"""Activation checkpointing that recomputes a whole block except its attention kernel.

`full` checkpointing keeps only each block's input and recomputes the block in backward, so
the attention forward runs twice; at 128K tokens attention is most of a Llama block's FLOPs.
This mode keeps the block input plus what the attention kernel returns (its output and the
log-sum-exp that its backward reads) and recomputes everything else: norms, the q/k/v and
output projections, RoPE and the SwiGLU. In backward the recomputed forward gets the kernel's
saved results back instead of running it again, so attention runs forward once, backward once.

It uses PyTorch's selective checkpointing (`create_selective_checkpoint_contexts`), which sees
every dispatched op: the kernels' forward ops are the ones saved, whichever attention entry
point (local, ring, all-gather varlen) called them. Communication inside a context-parallel
attention entry point is recomputed like any other op; only the kernels are skipped.
"""

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten

# Forward ops of every attention kernel titan_cp calls (context_parallel/kernels.py,
# varlen_kernels.py) and SDPA's other backends; their outputs include the LSE.
_ATTENTION_FORWARD_OPS = {
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._flash_attention_forward.default,
    aten._efficient_attention_forward.default,
}
# Kernels registered by optional packages, matched by name so they need not be importable.
_ATTENTION_FORWARD_OP_NAMES = {
    "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward",
    "cudnn::sdpa_fwd",
}


def is_attention_forward(func) -> bool:
    if func in _ATTENTION_FORWARD_OPS:
        return True
    # Under torch.compile the policy also sees higher-order ops, which have no schema name.
    name = func.name() if isinstance(func, torch._ops.OpOverload) else ""
    return name.split(".")[0] in _ATTENTION_FORWARD_OP_NAMES


def _policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if is_attention_forward(func) else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_except_attention(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with everything but the attention kernels' outputs recomputed in backward."""
    return checkpoint(
        fn, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _policy), **kwargs
    )
