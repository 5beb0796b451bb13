"""Apply activation checkpointing, compile and FSDP2 to a Llama built on the meta device.

The order is fixed (torchtitan's): activation checkpointing, then compile, then FSDP, each per
transformer block. Context parallelism needs no module rewrite here: the model was handed the
context-parallel attention entry point when it was built.
"""

from functools import wraps

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from titan_cp.parallel.parallel_dims import ParallelDims
from titan_cp.parallel.save_attention import checkpoint_except_attention

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _checkpoint(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_module(module: nn.Module, checkpoint_fn=_checkpoint) -> None:
    """Recompute `module`'s forward in backward through `checkpoint_fn`, keeping its parameter names.

    Wrapping the instance's forward (rather than the module) keeps state-dict keys identical
    with and without checkpointing, so checkpoints and HF export do not depend on the mode.
    """
    inner = module.forward

    @wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint_fn(inner, *args, **kwargs)

    module.forward = forward


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """`full` recomputes the whole block; `selective` recomputes its norms and feed-forward;
    `full_except_attention` recomputes the whole block but the attention kernel (save_attention.py).

    Selective keeps what attention saves (q, k, v, its output and LSE), so backward never
    repeats the attention kernel or its context-parallel communication, the costliest part of
    a long-context block, and recomputes the cheap RMSNorms (whose fp32 copies are large) and
    the SwiGLU, whose activations are the largest per token.
    """
    if mode == "full":
        checkpoint_module(block)
    elif mode == "full_except_attention":
        checkpoint_module(block, checkpoint_except_attention)
    elif mode == "selective":
        for module in (block.attention_norm, block.ffn_norm, block.feed_forward):
            checkpoint_module(module)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    for block in model.layers.values():
        checkpoint_block(block, mode)


def compile_enabled(enable: bool | str, device: torch.device) -> bool:
    """compile.enable: `auto` compiles on CUDA (fused norms, RoPE and SwiGLU) and not on CPU,
    where compiling costs more time than the short test runs it would speed up."""
    return device.type == "cuda" if enable == "auto" else bool(enable)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names unchanged); blocks share one compiled graph."""
    for block in model.layers.values():
        block.compile(fullgraph=False)


def set_prefetch(blocks: list[FSDPModule], depth: int) -> None:
    """Make each block issue the all-gathers of the next `depth` blocks in forward and of the
    previous `depth` blocks in backward, nearest first.

    On its own FSDP2 issues a block's forward all-gather when the CPU reaches that block (early
    enough while the CPU runs ahead of the GPU) and prefetches one block in backward. Gathering
    further ahead hides the all-gathers when a block's compute is shorter than its all-gather, at
    the cost of up to `depth` + 1 gathered blocks at once. `depth` 0 keeps FSDP2's own behaviour.
    Both setters are public since torch 2.4 (pytorch#128884) and act the same on 1-D (FSDP) and
    2-D (HSDP) meshes.
    """
    if depth == 0:
        return
    for index, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 1 + depth])
        # Backward runs the blocks in reverse, so the nearest previous block is gathered first.
        block.set_modules_to_backward_prefetch(blocks[max(index - depth, 0) : index][::-1])


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str,
    prefetch: int = 0,
) -> None:
    """Shard each block and the root over `mesh` (1-D: FSDP; 2-D: HSDP replicate x shard).

    Gradients are summed, not averaged: the loss is already
    divided by the global token count (invariant 4 in docs/architecture.md), so gradients equal cp=1's.
    `prefetch` is parallelism.fsdp_prefetch (see `set_prefetch`).
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        if reshard_after_forward == "default":
            # The last block's parameters are needed again at once by backward.
            reshard = index < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward == "always")
    # The root is left out: before the first block it computes only the embedding lookup, so there
    # is no compute for an early all-gather of the first blocks to hide behind.
    set_prefetch(blocks, prefetch)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM reduction: gloo has no PREMUL_SUM, which a divide factor would use.
            module.set_force_sum_reduction_for_comms(True)


def parallelize_llama(
    model: nn.Module,
    parallel_dims: ParallelDims,
    fsdp_mesh: DeviceMesh,
    device: torch.device,
    training,
    parallelism,
    activation_checkpoint,
    compile,
) -> None:
    apply_activation_checkpointing(model, activation_checkpoint.mode)
    if compile_enabled(compile.enable, device):
        apply_compile(model)
    if parallel_dims.uses_fsdp or device.type == "cuda":
        # CPU runs stay fp32 (no fast bf16 kernels there); on GPU FSDP also applies the
        # mixed-precision policy, also on a single GPU.
        on_gpu = device.type == "cuda"
        apply_fsdp(
            model,
            fsdp_mesh,
            param_dtype=DTYPES[training.mixed_precision_param] if on_gpu else torch.float32,
            reduce_dtype=DTYPES[training.mixed_precision_reduce] if on_gpu else torch.float32,
            reshard_after_forward=parallelism.fsdp_reshard_after_forward,
            prefetch=parallelism.fsdp_prefetch,
        )
