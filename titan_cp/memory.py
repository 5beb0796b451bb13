"""Estimate one rank's peak memory before anything is allocated, and refuse runs that cannot fit.

At long context a wrong setting costs minutes of start-up before an out-of-memory crash (8B at
128K tokens without activation checkpointing needs hundreds of GB per GPU). The trainer calls
`estimate_memory` from the config and the model args, prints `format()`, and `check_fits` stops
the run with one line naming the levers that would help. docs/memory.md derives every formula.
"""

import os
from dataclasses import dataclass, fields

import torch

from titan_cp.errors import UserError

GIB = 1024**3

# Device memory kept free for what the estimate does not model: allocator fragmentation and
# rounding (fraction), plus the CUDA context, NCCL buffers and cuBLAS/cuDNN workspaces, or on
# CPU the Python process and torch's libraries (fixed). docs/memory.md explains the numbers.
SAFETY_FRACTION = 0.10
FIXED_OVERHEAD_CUDA = 3 * GIB
FIXED_OVERHEAD_CPU = 1 * GIB

# Master parameters, their gradients and AdamW's two moments stay fp32 whatever the compute dtype
# (FSDP2 keeps the sharded parameters in fp32 and casts to bf16 only for the all-gather).
FP32 = 4


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a Llama 3 model, derived from its args without building it."""

    per_block: int
    embedding: int
    output: int  # 0 when the output projection is tied to the embedding
    final_norm: int
    n_layers: int

    @property
    def total(self) -> int:
        return self.n_layers * self.per_block + self.embedding + self.output + self.final_norm

    @property
    def non_embedding(self) -> int:
        """Parameters that cost 6 FLOPs per token: everything but the embedding lookup table."""
        return self.total - self.embedding


def ffn_hidden_dim(model_args) -> int:
    """The SwiGLU hidden size by the Llama formula: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * (4 * model_args.dim) / 3)
    if model_args.ffn_dim_multiplier is not None:
        hidden = int(model_args.ffn_dim_multiplier * hidden)
    multiple = model_args.multiple_of
    return multiple * ((hidden + multiple - 1) // multiple)


def count_params(model_args) -> ParamCounts:
    """Count parameters: wq/wk/wv/wo, w1/w2/w3 and two RMSNorm weights per block, plus the ends."""
    dim, head_dim = model_args.dim, model_args.head_dim
    q_width = model_args.n_heads * head_dim
    kv_width = model_args.n_kv_heads * head_dim
    attention = dim * q_width + 2 * dim * kv_width + q_width * dim
    feed_forward = 3 * dim * ffn_hidden_dim(model_args)
    embedding = model_args.vocab_size * dim
    return ParamCounts(
        per_block=attention + feed_forward + 2 * dim,
        embedding=embedding,
        output=0 if model_args.tie_word_embeddings else embedding,
        final_norm=dim,
        n_layers=model_args.n_layers,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on one rank, by kind. `total` is their sum."""

    params: int
    grads: int
    optimizer: int
    gathered_params_peak: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.gathered_params_peak
            + self.activations
            + self.loss
        )

    def format(self) -> str:
        """One line in GiB, printed by the trainer before it allocates the model."""
        parts = ", ".join(f"{f.name} {getattr(self, f.name) / GIB:.2f}" for f in fields(self))
        return f"estimated peak memory per rank {self.total / GIB:.2f} GiB ({parts})"


def _activation_elements_per_token(model_args, ffn_hidden: int, ac_mode: str) -> tuple[int, int]:
    """(elements one block keeps for backward per local token, those of a whole block).

    A whole block (no checkpointing) keeps: the inputs of its two RMSNorms and their outputs (the
    inputs of the projections), q, k and v and the attention output the flash-style kernel saves
    (never the S x S scores), the input of wo, and the SwiGLU's w1 and w3 outputs, silu(w1) and
    the product that feeds w2. Selective checkpointing keeps the block input and the attention
    output (and its LSE), recomputing the cheap rest; full keeps only the block input.
    """
    dim = model_args.dim
    q_width = model_args.n_heads * model_args.head_dim
    kv_width = model_args.n_kv_heads * model_args.head_dim
    whole_block = 4 * dim + 3 * q_width + 2 * kv_width + 4 * ffn_hidden
    kept = {"none": whole_block, "selective": dim + q_width, "full": dim}
    if ac_mode not in kept:
        raise UserError(
            f"activation_checkpoint.mode: {ac_mode!r} is not valid; use none, selective or full"
        )
    return kept[ac_mode], whole_block


def _attention_workspace_bytes_per_token(model_args, act_bytes: int, cp: int) -> int:
    """CP attention's transient buffers for one layer, per local token (the larger algorithm).

    batch_ring: two incoming K/V blocks (double-buffered), fp32 output/LSE accumulators, and in
    backward fp32 dQ plus the travelling fp32 dK/dV pair. varlen_llama3: all cp ranks' K/V
    gathered (heads_k_stride = all KV heads, the worst case) and their fp32 dK/dV before the
    reduce-scatter. Without cp the kernel works in place: only the fp32 LSE remains.
    """
    heads = model_args.n_heads
    q_width = heads * model_args.head_dim
    kv_width = model_args.n_kv_heads * model_args.head_dim
    if cp == 1:
        return heads * FP32
    ring = 2 * 2 * kv_width * act_bytes + (q_width + heads) * FP32 + (q_width + 2 * 2 * kv_width) * FP32
    all_gather = cp * 2 * kv_width * (act_bytes + FP32)
    return max(ring, all_gather)


def estimate_memory(
    model_args,
    seq_len: int,
    local_batch_size: int,
    dp_shard_cp: int,
    cp: int,
    ac_mode: str,
    param_dtype_bytes: int,
    loss_chunk_size: int,
    reshard_after_forward: bool = True,
) -> MemoryEstimate:
    """Estimate the peak memory of one rank for a training step.

    `seq_len` is the full sequence length (each rank holds seq_len/cp tokens of it),
    `dp_shard_cp` the number of ranks FSDP shards over, `param_dtype_bytes` the compute dtype's
    size (2 for bf16, 4 for fp32: also the activations' dtype), `loss_chunk_size` the tokens per
    logits chunk (0 = all local tokens at once). `reshard_after_forward=False` keeps every
    block's gathered parameters from forward to backward.
    """
    counts = count_params(model_args)
    local_tokens = local_batch_size * seq_len // cp
    sharded = counts.total / dp_shard_cp

    # FSDP gathers a block's bf16 parameters for compute; with prefetch two are in flight, and in
    # backward one block's unsharded gradient (compute dtype) and its fp32 reduce-scatter input
    # exist too. The root unit (embedding, final norm, output) is gathered next to a block.
    # Without sharding and without a cast, the parameters are used in place.
    if dp_shard_cp > 1 or param_dtype_bytes != FP32:
        largest_unit = max(counts.per_block, counts.embedding + counts.output + counts.final_norm)
        gathered = (
            (counts.per_block + largest_unit) * param_dtype_bytes
            + counts.per_block * (param_dtype_bytes + FP32)
        )
        if not reshard_after_forward:
            gathered += counts.n_layers * counts.per_block * param_dtype_bytes
    else:
        gathered = 0

    ffn_hidden = ffn_hidden_dim(model_args)
    kept, whole_block = _activation_elements_per_token(model_args, ffn_hidden, ac_mode)
    per_token = (
        # what every block keeps until its backward
        model_args.n_layers * kept * param_dtype_bytes
        # the block in backward: its activations recomputed (unless none were dropped), plus the
        # gradients of its widest intermediates (three of the SwiGLU's, two hidden-sized)
        + (whole_block if ac_mode != "none" else 0) * param_dtype_bytes
        + (3 * ffn_hidden + 2 * model_args.dim) * param_dtype_bytes
        + _attention_workspace_bytes_per_token(model_args, param_dtype_bytes, cp)
        # final norm input and output, and the hidden-state gradient flowing back
        + 3 * model_args.dim * param_dtype_bytes
    )
    activations = local_tokens * per_token

    # One chunk of logits: the compute-dtype matmul output, its fp32 copy and the fp32 gradient.
    chunk = local_tokens if loss_chunk_size <= 0 else min(loss_chunk_size, local_tokens)
    loss = chunk * model_args.vocab_size * (param_dtype_bytes + 2 * FP32)

    return MemoryEstimate(
        params=int(sharded * FP32),
        grads=int(sharded * FP32),
        optimizer=int(sharded * 2 * FP32),
        gathered_params_peak=int(gathered),
        activations=int(activations),
        loss=int(loss),
    )


def _cpu_available_bytes() -> int:
    """RAM the kernel could give this process now (MemAvailable), else physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_capacity(device: torch.device, ranks_sharing_device: int = 1) -> tuple[int, int, str]:
    """(bytes this rank may use, fixed overhead to keep free, a description of the device)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, FIXED_OVERHEAD_CUDA, f"{props.name} has {props.total_memory / GIB:.1f} GiB"
    available = _cpu_available_bytes()
    share = available // max(1, ranks_sharing_device)
    where = f"this machine has {available / GIB:.1f} GiB RAM available"
    if ranks_sharing_device > 1:
        where += f", {share / GIB:.1f} GiB for each of {ranks_sharing_device} local ranks"
    return share, FIXED_OVERHEAD_CPU, where


def check_fits(estimate: MemoryEstimate, device: torch.device, ranks_sharing_device: int = 1) -> None:
    """Raise UserError when the estimate plus the safety margin exceeds what the device has.

    On CPU all local ranks share the machine's RAM: pass their number as `ranks_sharing_device`.
    """
    capacity, overhead, where = device_capacity(device, ranks_sharing_device)
    needed = estimate.total * (1 + SAFETY_FRACTION) + overhead
    if needed <= capacity:
        return
    raise UserError(
        f"the run does not fit: {estimate.format()}; with the safety margin it needs "
        f"{needed / GIB:.1f} GiB but {where}; more cp or FSDP ranks "
        "(parallelism.context_parallel_degree, parallelism.data_parallel_shard_degree), "
        "activation_checkpoint.mode full, a smaller training.seq_len or training.local_batch_size "
        "would help"
    )
