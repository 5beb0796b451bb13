"""Estimate one rank's peak memory before anything is allocated, and refuse runs that cannot fit.

At long context a wrong setting costs minutes of start-up before an out-of-memory crash (8B at
128K tokens without activation checkpointing needs hundreds of GB per GPU). The trainer calls
`estimate_memory` from the config and the model args, prints `format()`, and `check_fits` stops
the run with one line naming the levers that would help. docs/memory.md derives every formula.
"""

import os
from collections.abc import Callable
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

# A compiled block's backward graph holds more at once than eager autograd (its partitioner
# decides what to save and when to recompute). Fitted to two compiled runs of the 1B model with
# full checkpointing on one H200 (256K and 512K tokens), which it over-estimates by 3.5%.
COMPILED_BACKWARD_FACTOR = 1.15

# The attention kernel's backward holds fp32 buffers of this many query widths per token (a dQ
# accumulator, and dK/dV at query-head width under GQA): fitted to the peaks of 1B at 1M and 8B
# at 512K tokens with one layer on one H200 (cuDNN), where attention's backward is the largest
# phase; 3 matched the 1B peak and over-estimated the 8B one by 7% (docs/memory.md).
ATTENTION_BACKWARD_FP32_WIDTHS = 3

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
    """Peak bytes on one rank's device, by kind. `host` is what the run keeps in host memory
    instead (offloaded activations and model state), not part of `total`.

    The sharded gradients fill up while backward frees the blocks' activations, block by block,
    so the peak holds the larger of all kept activations and all gradients plus one block's
    (`activations_last_block`); everything else adds up.
    """

    params: int
    grads: int
    optimizer: int
    gathered_params_peak: int
    activations: int
    backward_peak: int
    activations_last_block: int = 0
    host: int = 0

    @property
    def total(self) -> int:
        return (
            self.params
            + self.optimizer
            + self.gathered_params_peak
            + max(self.activations, self.grads + self.activations_last_block)
            + self.backward_peak
        )

    def format(self) -> str:
        """One line in GiB, printed by the trainer before it allocates the model."""
        shown = [f for f in fields(self) if f.name not in ("host", "activations_last_block")]
        parts = ", ".join(f"{f.name} {getattr(self, f.name) / GIB:.2f}" for f in shown)
        line = f"estimated peak memory per rank {self.total / GIB:.2f} GiB ({parts})"
        if self.host:
            line += f"; in host memory {self.host / GIB:.2f} GiB"
        return line


def _norm_bytes_per_token(dim: int, act_bytes: int) -> int:
    """What one RMSNorm (computed in fp32) and its consumer keep per token.

    Its fp32 input (the input itself when activations are fp32), the fp32 rsqrt, the normalised
    value cast back (saved by the weight multiply) and the output (saved by the next linear).
    """
    return dim * FP32 + FP32 + 2 * dim * act_bytes


def _widths(model_args) -> tuple[int, int, int, int]:
    """(dim, q width, kv width, ffn width) of a block."""
    q_width = model_args.n_heads * model_args.head_dim
    kv_width = model_args.n_kv_heads * model_args.head_dim
    return model_args.dim, q_width, kv_width, model_args.ffn_hidden_dim


def _attention_half_bytes_per_token(model_args, act_bytes: int) -> int:
    """Per local token, what a block keeps for backward outside the SwiGLU.

    Both norms, q, k and v and the output the flash-style kernel saves with its fp32 LSE (never
    the S x S scores; the output, laid out [B, S, H, D], also feeds wo without a copy). RoPE
    keeps only the cos/sin tables, shared by every layer.
    """
    dim, q_width, kv_width, _ = _widths(model_args)
    return (
        2 * _norm_bytes_per_token(dim, act_bytes)
        + (2 * q_width + 2 * kv_width) * act_bytes
        + model_args.n_heads * FP32
    )


def _swiglu_bytes_per_token(model_args, act_bytes: int) -> int:
    """What an untiled SwiGLU keeps without block checkpointing: w1's and w3's outputs (silu(w1)
    and the product feeding w2 are recomputed from them: parallelize.recompute_swiglu)."""
    return 2 * model_args.ffn_hidden_dim * act_bytes


def _kept_bytes_per_token(model_args, act_bytes: int, ac_mode: str, mlp_tiled: bool = False) -> int:
    """Bytes per local token a block keeps from its forward until its backward.

    Matches titan_cp.parallel.parallelize.checkpoint_block: selective checkpoints the two norms
    and the feed-forward (each keeps only its input, and a norm's output is kept by its
    consumer), full the whole block (only its input is kept), full_except_attention the whole
    block but attention's output and fp32 LSE, which it keeps besides the input. A tiled
    feed-forward keeps only its input, which is the feed-forward norm's output, already counted.
    """
    attention_half = _attention_half_bytes_per_token(model_args, act_bytes)
    if ac_mode == "none":
        return attention_half + (0 if mlp_tiled else _swiglu_bytes_per_token(model_args, act_bytes))
    if ac_mode == "selective":
        norm = _norm_bytes_per_token(model_args.dim, act_bytes)
        return attention_half - 2 * norm + 2 * 2 * model_args.dim * act_bytes
    if ac_mode == "full":
        return model_args.dim * act_bytes
    if ac_mode == "full_except_attention":
        return model_args.dim * act_bytes + _attention_output_bytes_per_token(model_args, act_bytes)
    raise UserError(
        f"activation_checkpoint.mode: {ac_mode!r} is not valid; use none, selective, full or full_except_attention"
    )


def _attention_output_bytes_per_token(model_args, act_bytes: int) -> int:
    """Attention's output and its fp32 LSE: what full_except_attention keeps of a block."""
    return model_args.n_heads * (model_args.head_dim * act_bytes + FP32)


def _attention_workspace_bytes_per_token(model_args, act_bytes: int, cp: int) -> int:
    """CP attention's transient buffers for one layer, per local token (the larger algorithm).

    batch_ring: the K/V block held and the one arriving; in backward the fp32 dQ accumulator,
    the kernel's dQ for the block, and three fp32 dK/dV pairs (this step's, the incoming one,
    the one being sent), in fp32, or at cp = 2 in the input dtype (the ring accumulates there in
    the input dtype). The forward's fp32 output accumulator is smaller than that. varlen_llama3: all cp ranks' K/V
    gathered (heads_k_stride = all KV heads, the worst case) and their fp32 dK/dV before the
    reduce-scatter. Without cp the kernel works in place.
    """
    if cp == 1:
        return 0
    _, q_width, kv_width, _ = _widths(model_args)
    accumulate = act_bytes if cp == 2 else FP32
    ring = 2 * 2 * kv_width * act_bytes + q_width * act_bytes + (q_width + 3 * 2 * kv_width) * accumulate
    all_gather = cp * 2 * kv_width * (act_bytes + FP32)
    return max(ring, all_gather)


def _block_backward_bytes(model_args, act_bytes: int, ac_mode: str, cp: int, local_tokens: int, mlp_chunk: int) -> int:
    """The largest working set of one block's backward beyond what the blocks keep.

    Two phases, whichever is larger (they do not coexist: autograd frees a node's saved tensors
    once its gradient is computed):
    - the SwiGLU's backward, at silu(w1) * w3's gradient: w1's and w3's outputs, silu(w1) and
      the product (recomputed in mode none) next to three gradients of the same width (seven, as
      counted on CPU), plus what checkpointing recomputed before it (full: the whole attention half; selective: the
      feed-forward norm's fp32 input and rsqrt). A tiled SwiGLU holds this for one chunk only
      (its saved four and their three gradients), plus every chunk's input gradient until they
      are joined;
    - attention's backward: the kernel's dQ, dK, dV and its fp32 accumulators, the gradient of
      its output, the cp workspace, and (full) the block's input and the recomputed attention
      half without the feed-forward norm.
    Both hold the incoming gradient and the residual gradient being accumulated (2 x dim).
    """
    dim, q_width, kv_width, ffn = _widths(model_args)
    a = act_bytes
    attention_half = _attention_half_bytes_per_token(model_args, a)
    norm = _norm_bytes_per_token(dim, a)
    residual_grads = 2 * dim * a
    kept_attention = _attention_output_bytes_per_token(model_args, a)
    recomputed_before_mlp = {
        "none": 0,
        "selective": norm - 2 * dim * a,
        "full": attention_half,
        "full_except_attention": attention_half - kept_attention,
    }[ac_mode]
    tiled = 0 < mlp_chunk < local_tokens
    if tiled:
        mlp_per_token = dim * a
        mlp_fixed = mlp_chunk * 7 * ffn * a
    else:
        # Untiled without block checkpointing, w1's and w3's outputs are among the kept tensors.
        mlp_per_token = 7 * ffn * a - (_swiglu_bytes_per_token(model_args, a) if ac_mode == "none" else 0)
        mlp_fixed = 0
    mlp_phase = local_tokens * (recomputed_before_mlp + mlp_per_token + residual_grads) + mlp_fixed
    # Full checkpointing: the block's input (fetched back when offloaded) and the recomputed
    # attention half without the feed-forward norm, whose backward is done (full_except_attention
    # keeps the input and attention's output and LSE among the kept tensors).
    recomputed_in_attention = {
        "full": dim * a + attention_half - norm,
        "full_except_attention": attention_half - norm - kept_attention,
    }.get(ac_mode, 0)
    attention_phase = local_tokens * (
        recomputed_in_attention
        + residual_grads
        + q_width * a  # gradient of the attention output
        + (q_width + 2 * kv_width) * a  # dQ, dK, dV
        + ATTENTION_BACKWARD_FP32_WIDTHS * q_width * FP32  # the kernel's fp32 accumulators
        + _attention_workspace_bytes_per_token(model_args, a, cp)
    )
    return max(mlp_phase, attention_phase)


def loss_chunk_bytes(model_args, local_tokens: int, loss_chunk_size: int, act_bytes: int) -> int:
    """One chunk of logits (titan_cp.loss recomputes each chunk in backward): the compute-dtype
    matmul output, then in fp32 the logits, the log-softmax cross entropy keeps, its gradient and
    the logits' gradient, of which three are alive at once."""
    chunk = local_tokens if loss_chunk_size <= 0 else min(loss_chunk_size, local_tokens)
    return chunk * model_args.vocab_size * (act_bytes + 3 * FP32)


def estimate_memory(
    model_args,
    seq_len: int,
    local_batch_size: int,
    fsdp_shard: int,
    cp: int,
    ac_mode: str,
    param_dtype_bytes: int,
    loss_chunk_size: int,
    reshard_after_forward: str = "default",
    fsdp_prefetch: int = 0,
    mlp_chunk_size: int = 0,
    activation_offload: bool = False,
    cpu_offload: bool = False,
    compiled: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of one rank for a training step (docs/memory.md derives it).

    `seq_len` is the full sequence length (each rank holds seq_len/cp tokens of it),
    `fsdp_shard` the number of ranks FSDP shards each parameter over (ParallelDims.fsdp_shard),
    `param_dtype_bytes` the compute dtype's size (2 for bf16, 4 for fp32: also the activations'
    dtype), `loss_chunk_size` the tokens per logits chunk (0 = all local tokens at once),
    `reshard_after_forward` the value of
    parallelism.fsdp_reshard_after_forward ("never" keeps every block gathered until backward),
    `fsdp_prefetch` parallelism.fsdp_prefetch (N >= 2 holds N + 1 gathered blocks at once),
    `mlp_chunk_size` training.mlp_chunk_size, `activation_offload` activation_checkpoint.offload,
    `cpu_offload` training.enable_cpu_offload, `compiled` compile.enable.
    """
    counts = count_params(model_args)
    local_tokens = local_batch_size * seq_len // cp
    sharded = counts.total / fsdp_shard
    act = param_dtype_bytes
    # AdamW's two moments exist from the first optimizer step on, so from the second step's
    # backward every field below is alive at once.
    state = {"params": sharded * FP32, "grads": sharded * FP32, "optimizer": sharded * 2 * FP32}
    host = 0
    if cpu_offload:
        host += sum(state.values())
        state = dict.fromkeys(state, 0)

    # FSDP's root unit (embedding, final norm, output) stays gathered from forward to the end of
    # backward, and so do its unsharded gradients; per block, two are gathered at once with
    # FSDP2's own prefetch (the running block and the next), N + 1 with an explicit prefetch of
    # N blocks, and in backward one block's unsharded gradient and its fp32 reduce-scatter
    # input exist too. Without sharding and without a cast, parameters are used in place. With
    # CPU offload each unit's fp32 shards are also copied to the device before the all-gather.
    if fsdp_shard > 1 or param_dtype_bytes != FP32 or cpu_offload:
        root = counts.embedding + counts.output + counts.final_norm
        blocks_gathered = max(2, fsdp_prefetch + 1)
        gathered = 2 * root * act + blocks_gathered * counts.per_block * act + counts.per_block * (act + FP32)
        if reshard_after_forward == "never":
            gathered += counts.n_layers * counts.per_block * act
        if cpu_offload:
            gathered += (root + blocks_gathered * counts.per_block) * FP32 / fsdp_shard
    else:
        gathered = 0

    tiled = 0 < mlp_chunk_size < local_tokens
    kept = local_tokens * _kept_bytes_per_token(model_args, act, ac_mode, tiled)
    # Offloaded, every block's saved tensors are copied to the host and leave the device once
    # copied; in backward the block running and the one being fetched back are on the device
    # (in forward, the one computing and the one still copying out).
    blocks_on_device = min(model_args.n_layers, 2) if activation_offload else model_args.n_layers
    # Selective checkpointing caches what its policy saves itself, outside autograd's saved-tensor
    # hooks, so offload cannot move it: every block keeps full_except_attention's attention
    # outputs, and mode none's w1 and w3 outputs (untiled; parallelize.recompute_swiglu).
    unmovable = 0
    if activation_offload and ac_mode == "full_except_attention":
        unmovable = local_tokens * _attention_output_bytes_per_token(model_args, act)
    elif activation_offload and ac_mode == "none" and not tiled:
        unmovable = local_tokens * _swiglu_bytes_per_token(model_args, act)
    if activation_offload:
        host += model_args.n_layers * (kept - unmovable)
    dim = model_args.dim
    # Shared by all blocks for the whole step: RoPE's fp32 cos/sin tables.
    rope = local_tokens * 2 * model_args.head_dim * FP32
    block_backward = _block_backward_bytes(model_args, act, ac_mode, cp, local_tokens, mlp_chunk_size)
    if compiled:
        block_backward = int(block_backward * COMPILED_BACKWARD_FACTOR)
    # Backward starts with the loss: the final norm's saved tensors and its input's gradient
    # next to one chunk of logits; then the blocks, one at a time.
    loss_backward = local_tokens * (_norm_bytes_per_token(dim, act) + 2 * dim * act) + loss_chunk_bytes(
        model_args, local_tokens, loss_chunk_size, act
    )
    return MemoryEstimate(
        params=int(state["params"]),
        grads=int(state["grads"]),
        optimizer=int(state["optimizer"]),
        gathered_params_peak=int(gathered),
        activations=int(blocks_on_device * kept + (model_args.n_layers - blocks_on_device) * unmovable + rope),
        backward_peak=int(max(block_backward, loss_backward)),
        activations_last_block=int(kept + rope),
        host=int(host),
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


# The levers that lower a rank's peak, named in every refusal and out-of-memory message.
LEVERS = (
    "training.mlp_chunk_size (e.g. 8192), activation_checkpoint.offload true, activation_checkpoint.mode full,"
    " a smaller training.loss_chunk_size, more cp or FSDP ranks (parallelism.context_parallel_degree,"
    " parallelism.data_parallel_shard_degree), training.enable_cpu_offload true, a smaller training.seq_len"
    " or training.local_batch_size"
)


def out_of_memory_message() -> str:
    """The one line a rank prints when its device runs out of memory inside a step."""
    where = "CPU"
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        where = (
            f"GPU {device} of {total / GIB:.1f} GiB, peak allocated {torch.cuda.max_memory_allocated(device) / GIB:.1f}"
            f" GiB, reserved {torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB"
        )
    return (
        f"out of memory on rank {os.environ.get('RANK', '0')} ({where}); lower the peak per device with {LEVERS};"
        " run_train.sh CONFIG [overrides] --help-memory prints the longest training.seq_len that fits and the next lever"
    )


def needed_bytes(estimate: MemoryEstimate, overhead: int) -> float:
    """Device memory a run needs: the estimate with its safety margin and the fixed overhead."""
    return estimate.total * (1 + SAFETY_FRACTION) + overhead


def fit_problem(
    estimate: MemoryEstimate, device: torch.device, ranks_sharing_device: int = 1, first_lever: str = ""
) -> str:
    """Why the run does not fit, in one line; "" when it fits. It does not fit when the estimate
    plus the safety margin exceeds what the device has, or what the run keeps in host memory
    exceeds the RAM available.

    On CPU all local ranks share the machine's RAM: pass their number as `ranks_sharing_device`;
    there the host part adds to the device part. `first_lever` names a lever this run has beyond
    LEVERS, put first in the refusal.
    """
    capacity, overhead, where = device_capacity(device, ranks_sharing_device)
    needed = needed_bytes(estimate, overhead) + (estimate.host if device.type == "cpu" else 0)
    if needed > capacity:
        levers = f"{first_lever}, {LEVERS}" if first_lever else LEVERS
        return (
            f"the run does not fit: {estimate.format()}; with the safety margin it needs "
            f"{needed / GIB:.1f} GiB but {where}; {levers} would help"
        )
    if device.type == "cuda" and estimate.host:
        # On a GPU machine every local rank is a GPU: they all share the host's RAM.
        ranks_on_host = max(1, torch.cuda.device_count())
        host_share = _cpu_available_bytes() // ranks_on_host
        if estimate.host > host_share:
            return (
                f"the run does not fit in host memory: {estimate.format()}, but {host_share / GIB:.1f} GiB of RAM"
                f" is available per GPU; switch off activation_checkpoint.offload or training.enable_cpu_offload,"
                " or use more cp or FSDP ranks"
            )
    return ""


def check_fits(
    estimate: MemoryEstimate, device: torch.device, ranks_sharing_device: int = 1, first_lever: str = ""
) -> None:
    """Raise UserError with `fit_problem`'s line when the run does not fit."""
    problem = fit_problem(estimate, device, ranks_sharing_device, first_lever)
    if problem:
        raise UserError(problem)


# activation_checkpoint.mode values from least to most recomputation, which on an H200 is also
# fastest to slowest (docs/performance.md: none, selective, full_except_attention at 64K), and
# from most to least memory. `auto` takes the first whose estimate fits.
AC_MODES_FASTEST_FIRST = ("none", "selective", "full_except_attention", "full")


def choose_ac_mode(fits: Callable[[str], bool]) -> str:
    """activation_checkpoint.mode auto: the fastest mode that `fits`, else the smallest (full),
    whose refusal then names the other levers."""
    return next((mode for mode in AC_MODES_FASTEST_FIRST if fits(mode)), AC_MODES_FASTEST_FIRST[-1])


def estimate_for_config(
    model_args, cfg, fsdp_shard: int, cp: int, on_gpu: bool, seq_len: int | None = None, ac_mode: str | None = None
) -> MemoryEstimate:
    """`estimate_memory` for a JobConfig's training, parallelism, activation checkpointing and
    compile sections; `seq_len` overrides training.seq_len (the --help-memory search) and
    `ac_mode` activation_checkpoint.mode (what `auto` tries)."""
    training = cfg.training
    return estimate_memory(
        model_args,
        seq_len=training.seq_len if seq_len is None else seq_len,
        local_batch_size=training.local_batch_size,
        fsdp_shard=fsdp_shard,
        cp=cp,
        ac_mode=ac_mode or cfg.activation_checkpoint.mode,
        # CPU runs always compute in fp32.
        param_dtype_bytes=2 if on_gpu and training.mixed_precision_param == "bfloat16" else FP32,
        loss_chunk_size=training.loss_chunk_size,
        reshard_after_forward=cfg.parallelism.fsdp_reshard_after_forward,
        fsdp_prefetch=cfg.parallelism.fsdp_prefetch,
        mlp_chunk_size=training.mlp_chunk_size,
        activation_offload=cfg.activation_checkpoint.offload,
        cpu_offload=training.enable_cpu_offload,
        # compile.enable "auto" compiles on CUDA only (titan_cp.parallel.parallelize.compile_enabled).
        compiled=cfg.compile.enable is True or (cfg.compile.enable == "auto" and on_gpu),
    )
