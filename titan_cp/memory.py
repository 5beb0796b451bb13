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
SAFETY_FRACTION = 0.05
FIXED_OVERHEAD_CUDA = 3 * GIB
FIXED_OVERHEAD_CPU = 1 * GIB

# Master parameters, their gradients and AdamW's two moments stay fp32 whatever the compute dtype
# (FSDP2 keeps the sharded parameters in fp32 and casts to bf16 only for the all-gather).
FP32 = 4


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a Llama 3 model by where they live: the blocks, and the root's ends."""

    per_block: int
    embedding: int
    output: int  # 0 when the output projection is tied to the embedding
    final_norm: int
    n_layers: int

    @property
    def total(self) -> int:
        return self.n_layers * self.per_block + self.embedding + self.output + self.final_norm


def count_params(model_args) -> ParamCounts:
    """Split `model_args.num_params()` (the one parameter count) into the blocks and the ends."""
    embedding = model_args.vocab_size * model_args.dim
    output = 0 if model_args.tie_word_embeddings else embedding
    final_norm = model_args.dim
    blocks = model_args.num_params() - embedding - output - final_norm
    return ParamCounts(
        per_block=blocks // model_args.n_layers,
        embedding=embedding,
        output=output,
        final_norm=final_norm,
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


def _norm_bytes_per_token(dim: int, act_bytes: int) -> int:
    """What one RMSNorm (computed in fp32) and its consumer keep per token.

    Its fp32 input (the input itself when activations are fp32), the fp32 rsqrt, the normalised
    value cast back (saved by the weight multiply) and the output (saved by the next linear).
    """
    return dim * FP32 + FP32 + 2 * dim * act_bytes


def _block_bytes_per_token(model_args, act_bytes: int) -> dict[str, int]:
    """Per local token, what a block keeps for backward: its attention half and its SwiGLU half.

    Attention half: the attention norm, q, k and v and the output the flash-style kernel saves
    with its fp32 LSE (never the S x S scores; the output, laid out [B, S, H, D], also feeds wo
    without a copy), and the feed-forward norm. SwiGLU half: w1's and w3's outputs, silu(w1) and the product feeding w2.
    RoPE keeps only the cos/sin tables, shared by every layer.
    """
    dim, heads = model_args.dim, model_args.n_heads
    q_width = heads * model_args.head_dim
    kv_width = model_args.n_kv_heads * model_args.head_dim
    attention_half = (
        2 * _norm_bytes_per_token(dim, act_bytes)
        + (2 * q_width + 2 * kv_width) * act_bytes
        + heads * FP32
    )
    return {"attention_half": attention_half, "swiglu_half": 4 * model_args.ffn_hidden_dim * act_bytes}


def _kept_and_recomputed(model_args, act_bytes: int, ac_mode: str) -> tuple[int, int]:
    """(bytes a block keeps until its backward, bytes recomputed for the block in backward).

    Matches titan_cp.parallel.parallelize.checkpoint_block: selective checkpoints the two norms
    and the feed-forward (each keeps only its input, and a norm's output is kept by its
    consumer), full the whole block (only its input is kept), full_except_attention the whole
    block but attention's output and fp32 LSE, which it keeps besides the input.
    """
    halves = _block_bytes_per_token(model_args, act_bytes)
    whole = halves["attention_half"] + halves["swiglu_half"]
    if ac_mode == "none":
        return whole, 0
    if ac_mode == "selective":
        norm = _norm_bytes_per_token(model_args.dim, act_bytes)
        checkpointed_norm = 2 * model_args.dim * act_bytes
        kept = halves["attention_half"] - 2 * norm + 2 * checkpointed_norm
        return kept, halves["swiglu_half"] + norm
    if ac_mode == "full":
        return model_args.dim * act_bytes, whole
    if ac_mode == "full_except_attention":
        attention = model_args.n_heads * (model_args.head_dim * act_bytes + FP32)
        return model_args.dim * act_bytes + attention, whole - attention
    raise UserError(
        f"activation_checkpoint.mode: {ac_mode!r} is not valid; use none, selective, full or full_except_attention"
    )


def _attention_workspace_bytes_per_token(model_args, act_bytes: int, cp: int) -> int:
    """CP attention's transient buffers for one layer, per local token (the larger algorithm).

    batch_ring: the K/V block held and the one arriving; in backward the fp32 dQ accumulator,
    the kernel's dQ for the block, and three fp32 dK/dV pairs (this step's, the incoming one,
    the one being sent); at cp = 2 these accumulate in the input dtype, so this is an upper bound
    there. The forward's fp32 output accumulator is smaller than that. varlen_llama3: all cp ranks' K/V
    gathered (heads_k_stride = all KV heads, the worst case) and their fp32 dK/dV before the
    reduce-scatter. Without cp the kernel works in place.
    """
    if cp == 1:
        return 0
    q_width = model_args.n_heads * model_args.head_dim
    kv_width = model_args.n_kv_heads * model_args.head_dim
    ring = 2 * 2 * kv_width * act_bytes + q_width * act_bytes + (q_width + 3 * 2 * kv_width) * FP32
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
    reshard_after_forward: str = "default",
    fsdp_prefetch: int = 0,
) -> MemoryEstimate:
    """Estimate the peak memory of one rank for a training step.

    `seq_len` is the full sequence length (each rank holds seq_len/cp tokens of it),
    `dp_shard_cp` the number of ranks FSDP shards over, `param_dtype_bytes` the compute dtype's
    size (2 for bf16, 4 for fp32: also the activations' dtype), `loss_chunk_size` the tokens per
    logits chunk (0 = all local tokens at once), `reshard_after_forward` the value of
    parallelism.fsdp_reshard_after_forward ("never" keeps every block gathered until backward),
    `fsdp_prefetch` parallelism.fsdp_prefetch (N >= 2 holds N + 1 gathered blocks at once).
    """
    counts = count_params(model_args)
    local_tokens = local_batch_size * seq_len // cp
    sharded = counts.total / dp_shard_cp
    act = param_dtype_bytes

    # FSDP's root unit (embedding, final norm, output) stays gathered from forward to the end of
    # backward, and so do its unsharded gradients; per block, two are gathered at once with
    # FSDP2's own prefetch (the running block and the next), N + 1 with an explicit prefetch of
    # N blocks, and in backward one block's unsharded gradient and its fp32 reduce-scatter
    # input exist too. Without sharding and without a cast, parameters are used in place.
    if dp_shard_cp > 1 or param_dtype_bytes != FP32:
        root = counts.embedding + counts.output + counts.final_norm
        blocks_gathered = max(2, fsdp_prefetch + 1)
        gathered = 2 * root * act + blocks_gathered * counts.per_block * act + counts.per_block * (act + FP32)
        if reshard_after_forward == "never":
            gathered += counts.n_layers * counts.per_block * act
    else:
        gathered = 0

    kept, recomputed = _kept_and_recomputed(model_args, act, ac_mode)
    dim = model_args.dim
    # In backward one block at a time holds what checkpointing dropped (recomputed), then the
    # gradients of its widest intermediates (three SwiGLU-sized, two hidden-sized, the norms'
    # fp32 ones) as those recomputed tensors are freed, and inside attention the cp workspace.
    # These phases do not overlap, so the peak adds only the largest (measured on 2 H200s:
    # docs/memory.md).
    transient = max(
        recomputed,
        (3 * model_args.ffn_hidden_dim + 2 * dim) * act + 2 * dim * FP32,
        _attention_workspace_bytes_per_token(model_args, act, cp),
    )
    per_token = (
        model_args.n_layers * kept
        + transient
        # shared by all blocks: RoPE's fp32 cos/sin; after them the final norm
        + 2 * model_args.head_dim * FP32
        + _norm_bytes_per_token(dim, act)
    )
    activations = local_tokens * per_token

    # One chunk of logits (titan_cp.loss recomputes each chunk in backward): the compute-dtype
    # matmul output, then in fp32 the logits, the log-softmax cross entropy keeps, its gradient
    # and the logits' gradient, of which three are alive at once.
    chunk = local_tokens if loss_chunk_size <= 0 else min(loss_chunk_size, local_tokens)
    loss = chunk * model_args.vocab_size * (act + 3 * FP32)

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
