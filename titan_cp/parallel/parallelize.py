"""Apply activation checkpointing, compile and FSDP2 to a Llama built on the meta device.

The order is fixed (torchtitan's): activation checkpointing (with the feed-forward's sequence
tiling), activation offload, then compile, then FSDP, each per transformer block. Offload wraps
outside checkpointing so that the checkpoint's saved inputs pass through its hooks. Context
parallelism needs no module rewrite here: the model was handed the context-parallel attention
entry point when it was built.
"""

from functools import partial, wraps

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from titan_cp.parallel.activation_offload import apply_activation_offload
from titan_cp.parallel.parallel_dims import ParallelDims
from titan_cp.parallel.save_attention import checkpoint_except_attention
from titan_cp.parallel.sequence_tiling import tile_over_sequence

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


# Matmul ops a linear layer dispatches to, with the index of the weight operand: bf16 (with and
# without bias) and torchao's Float8, whose only op is the private `_scaled_mm` (no public name
# exists; if a torch release drops it, this module fails to import rather than silently
# recomputing Float8 matmuls).
_MATMULS = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2, torch.ops.aten._scaled_mm.default: 1}


def _keep_hidden_width_matmuls(hidden_dim: int, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of the matmuls that produce `hidden_dim`-wide tensors (w1's and w3's),
    recompute everything else. The op's output width is its weight operand's column count."""
    weight = args[_MATMULS[func]] if func in _MATMULS else None
    if weight is not None and weight.shape[-1] == hidden_dim:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def recompute_swiglu(feed_forward: nn.Module) -> None:
    """Keep w1's and w3's outputs for backward, and recompute silu(w1 x) * w3 x from them.

    Left alone, eager autograd keeps four tensors of the hidden width per token (w1's and w3's
    outputs, the silu and the product that w2's weight gradient reads) and a compiled block three
    (the compile partitioner does not recompute a value a matmul's backward reads). A
    selective-checkpoint region over the feed-forward keeps the two matmul outputs and recomputes
    the two pointwise ops, one read of two tensors and one write, before w2's backward. For the
    1B at 64K tokens it frees 16 GiB at no measurable cost in speed (docs/performance.md).
    w2's output is recomputed too: nothing in backward reads it, so it is never computed again.
    """
    policy = partial(_keep_hidden_width_matmuls, feed_forward.w1.out_features)
    checkpoint_module(
        feed_forward, partial(_checkpoint, context_fn=partial(create_selective_checkpoint_contexts, policy))
    )


def checkpoint_block(block: nn.Module, mode: str, recompute_feed_forward: bool = True) -> None:
    """`full` recomputes the whole block; `selective` recomputes its norms and feed-forward;
    `full_except_attention` recomputes the whole block but the attention kernel (save_attention.py);
    `none` recomputes only the SwiGLU's pointwise ops (`recompute_swiglu`).

    Selective keeps what attention saves (q, k, v, its output and LSE), so backward never
    repeats the attention kernel or its context-parallel communication, the costliest part of
    a long-context block, and recomputes the cheap RMSNorms (whose fp32 copies are large) and
    the SwiGLU, whose activations are the largest per token. `recompute_feed_forward=False`
    leaves the feed-forward alone when it already recomputes itself chunk by chunk (tiled).
    """
    if mode == "none":
        if recompute_feed_forward:
            recompute_swiglu(block.feed_forward)
    elif mode == "full":
        checkpoint_module(block)
    elif mode == "full_except_attention":
        checkpoint_module(block, checkpoint_except_attention)
    elif mode == "selective":
        modules = [block.attention_norm, block.ffn_norm]
        if recompute_feed_forward:
            modules.append(block.feed_forward)
        for module in modules:
            checkpoint_module(module)


def apply_activation_checkpointing(model: nn.Module, mode: str, mlp_chunk_size: int = 0) -> None:
    for block in model.layers.values():
        if mlp_chunk_size > 0:
            tile_over_sequence(block.feed_forward, mlp_chunk_size)
        checkpoint_block(block, mode, recompute_feed_forward=mlp_chunk_size == 0)


def compile_enabled(enable: bool | str, device: torch.device) -> bool:
    """compile.enable: `auto` compiles on CUDA (fused norms, RoPE and SwiGLU) and not on CPU,
    where compiling costs more time than the short test runs it would speed up."""
    return device.type == "cuda" if enable == "auto" else bool(enable)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names unchanged; blocks share one compiled graph) and the
    output projection with the loss, chunk by chunk (titan_cp.loss)."""
    for block in model.layers.values():
        block.compile(fullgraph=False)
    model.compile_loss = True


def set_prefetch(blocks: list[FSDPModule], depth: int) -> None:
    """Make each block issue the all-gathers of the next `depth` blocks in forward and of the
    previous `depth` blocks in backward, nearest first.

    On its own FSDP2 issues a block's forward all-gather when the CPU reaches that block (early
    enough while the CPU runs ahead of the GPU) and prefetches one block in backward. Gathering
    further ahead hides the all-gathers when a block's compute is shorter than its all-gather, at
    the cost of up to `depth` + 1 gathered blocks at once. `depth` 0 keeps FSDP2's own behaviour.
    Both setters are public since torch 2.6 (FSDPModule's public home; tests/test_torch_floor.py)
    and act the same on 1-D (FSDP) and 2-D (HSDP) meshes.
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
    cpu_offload: bool = False,
) -> None:
    """Shard each block and the root over `mesh` (1-D: FSDP; 2-D: HSDP replicate x shard).

    Gradients are summed, not averaged: the loss is already
    divided by the global token count (invariant 4 in docs/architecture.md), so gradients equal cp=1's.
    With HSDP the replicate dimension's all-reduce sums too: a divide factor of 1 with forced sum
    reduction makes FSDP2 use SUM for both collectives (tests/test_multinode_launch.py compares
    the gradient norm of node-local sharding with one process's).
    `prefetch` is parallelism.fsdp_prefetch (see `set_prefetch`). `cpu_offload`
    (training.enable_cpu_offload) keeps the sharded parameters, their gradients and so the
    optimizer state in host memory; FSDP2 copies each unit's shards to the device for its
    all-gather and the reduced gradients back. The parameters must be on the CPU when sharded.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory makes the copies asynchronous; it needs CUDA.
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        if reshard_after_forward == "default":
            # The last block's parameters are needed again at once by backward.
            reshard = index < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard, offload_policy=offload_policy)
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=mp_policy,
        reshard_after_forward=reshard_after_forward == "always",
        offload_policy=offload_policy,
    )
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
    apply_activation_checkpointing(model, activation_checkpoint.mode, training.mlp_chunk_size)
    if activation_checkpoint.offload:
        apply_activation_offload(list(model.layers.values()), device)
    if compile_enabled(compile.enable, device):
        apply_compile(model)
    if parallel_dims.uses_fsdp or device.type == "cuda" or training.enable_cpu_offload:
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
            cpu_offload=training.enable_cpu_offload,
        )
