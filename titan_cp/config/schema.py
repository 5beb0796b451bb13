"""The config schema: one dataclass per TOML section.

Key names follow torchtitan v0.2.2 where it has them. Every field carries a one-line help text
(`--help` prints it); choices are `Literal` types so the loader can check them.
"""

from dataclasses import dataclass, field
from typing import Literal

from titan_cp.extras import install_hint

# A boolean that may also be left to the device: "auto" decides when the run starts.
AutoBool = bool | Literal["auto"]


def option(default, help: str):
    """A config field with its help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Job:
    config_file: str = option("", "TOML file to read; command-line overrides win over it")
    dump_folder: str = option("./outputs", "folder for metrics.jsonl and checkpoints")
    description: str = option("", "free text describing the run")


@dataclass
class Model:
    name: Literal["llama3"] = option("llama3", "model family")
    flavor: str = option(
        "debugmodel", "model size: debugmodel, 1B, 8B, 70B or 405B; not used when model.hf_assets_path is set"
    )
    hf_assets_path: str = option(
        "", "Hugging Face model folder: the model's shape comes from its config.json, the tokenizer from its files"
    )
    tokenizer_path: str = option(
        "",
        "Hugging Face tokenizer.json file or tokenizer folder; empty: the model.hf_assets_path folder,"
        " else assets/tokenizer/tokenizer.json",
    )
    attn_implementation: Literal["auto", "cudnn", "flash", "sdpa_cpu", "flash_attn"] = option(
        "auto",
        "local attention kernel: auto (cuDNN on Hopper, flash elsewhere on CUDA, CPU kernel on CPU),"
        " cudnn, flash, sdpa_cpu, or flash_attn (the flash-attn package); with packing, cudnn runs"
        " cuDNN's varlen kernel when the [cudnn] extra is installed, else FA2 varlen",
    )
    converters: list[Literal["float8"]] = field(
        default_factory=list,
        metadata={
            "help": "model rewrites applied before parallelisation: float8 (torchao Float8 linear layers,"
            f" CUDA only, {install_hint('float8')}); a TOML array or a comma list on the command line"
        },
    )


@dataclass
class Float8:
    filter_fqns: list[str] = field(
        default_factory=list,
        metadata={
            "help": "under model.converters = float8, linear layers whose name contains one of these stay"
            " bf16; empty (the default) converts every linear layer, the output projection included"
            " (torchtitan keeps it bf16: output)"
        },
    )


@dataclass
class Optimizer:
    name: Literal["AdamW"] = option("AdamW", "optimizer")
    lr: float = option(8e-4, "peak learning rate")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay")


@dataclass
class LRScheduler:
    warmup_steps: int = option(200, "steps of linear warmup from near zero to optimizer.lr")
    decay_ratio: float = option(
        -1.0, "fraction of the steps spent decaying at the end; -1 decays over all steps after warmup"
    )
    decay_type: Literal["linear", "cosine", "sqrt"] = option("linear", "shape of the decay")
    min_lr_factor: float = option(0.0, "final learning rate as a fraction of optimizer.lr")


@dataclass
class Training:
    dataset_path: str = option(
        "assets/data/tinyshakespeare.txt",
        "a .jsonl, .jsonl.gz, .json, .parquet or .txt file, a folder of them, or a datasets save_to_disk folder",
    )
    dataset_format: Literal["auto", "text", "chat", "alpaca", "prompt_completion"] = option(
        "auto", "record format: auto (from the first record's keys), text, chat (messages), alpaca"
        " (instruction, input, output) or prompt_completion (prompt, completion)",
    )
    train_on_inputs: Literal["auto", "true", "false"] = option(
        "auto", "also train on prompts, user and system turns; auto: false for chat, alpaca and"
        " prompt_completion (text always trains on every token)",
    )
    truncation: Literal["auto", "split", "truncate", "drop"] = option(
        "auto", "a document longer than seq_len: split into pieces, truncate to its first seq_len tokens,"
        " or drop it; auto: split for text, truncate for the other formats",
    )
    dataset_cache_dir: str = option(
        "",
        "folder for token caches (tokenized once, reused while the data, tokenizer and format are unchanged);"
        " empty: .titan_cp_cache next to the dataset",
    )
    seq_len: int = option(2048, "tokens per sequence (the full length, before cp sharding)")
    local_batch_size: int = option(8, "sequences per micro-batch on each data-parallel rank")
    global_batch_size: int = option(
        -1, "sequences per optimizer step over all data-parallel ranks; -1 means local x dp (no accumulation)"
    )
    steps: int = option(10000, "optimizer steps to train")
    max_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping")
    mixed_precision_param: Literal["bfloat16", "float32"] = option(
        "bfloat16", "parameter dtype for compute on GPU (CPU always runs float32)"
    )
    mixed_precision_reduce: Literal["float32", "bfloat16"] = option(
        "float32", "gradient reduce-scatter dtype on GPU"
    )
    sample_packing: bool = option(
        False, "pack documents into sequences; attention never crosses a document boundary"
    )
    loss_chunk_size: int = option(
        4096, "tokens per chunk of the output projection and loss; 0 computes all logits at once"
    )
    mlp_chunk_size: int = option(
        0, "tokens per chunk of the feed-forward, recomputed chunk by chunk in backward so no"
        " [seq, ffn_dim] intermediate exists for the whole local sequence; 0 runs it in one piece",
    )
    enable_cpu_offload: bool = option(
        False, "keep parameters, gradients and optimizer state in host memory (FSDP2 CPUOffloadPolicy);"
        " the optimizer step runs on the CPU",
    )


@dataclass
class Validation:
    enable: bool = option(False, "compute the loss on validation.dataset_path every validation.freq steps")
    dataset_path: str = option(
        "", "validation data in any form training.dataset_path accepts; read with the training's tokenizer,"
        " format, seq_len and packing",
    )
    freq: int = option(500, "steps between validation runs (at every step divisible by it)")
    steps: int = option(
        -1, "validation steps of training.global_batch_size sequences each; -1 reads the whole validation set once"
    )


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = option(1, "HSDP replicas (all-reduce dimension)")
    data_parallel_shard_degree: int = option(-1, "FSDP shards; -1 fills the rest of the world size")
    context_parallel_degree: int = option(1, "ranks one sequence is split over")
    context_parallel_ulysses_degree: int = option(
        1, "the part of context_parallel_degree that splits attention heads by all-to-all (Ulysses),"
        " on adjacent ranks of one node; context_parallel_degree / this is the ring (or all-gather) part",
    )
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = option(
        "default", "free gathered parameters after forward: default lets FSDP decide per module"
    )
    fsdp_shard_within_node: bool = option(
        True, "when FSDP's shard group (dp_shard x cp ranks) spans several nodes, shard over one node's"
        " ranks and replicate across nodes (HSDP): all-gathers and reduce-scatters stay inside a node,"
        " at the memory cost of fewer shards; false shards over the whole group",
    )
    fsdp_prefetch: int = option(
        0, "all-gather prefetch depth: 0 leaves prefetching to FSDP2; N makes each block gather the next N"
        " blocks in forward and the previous N in backward (up to N+1 blocks gathered at once)",
    )
    context_parallel_load_balancer: Literal["zigzag", "none"] = option(
        "zigzag", "sequence layout: zigzag (balanced causal work: 2*cp chunks for batch_ring, 2*cp chunks of"
        " every document with packing) or none (contiguous)"
    )
    ring_attn_func: Literal["auto", "batch_ring", "varlen_llama3"] = option(
        "auto", "cp attention: batch_ring (p2p ring) or varlen_llama3 (all-gather K/V); auto picks"
        " varlen_llama3 when packing, else batch_ring",
    )
    heads_k_stride: int = option(
        0, "KV heads all-gathered at a time by varlen_llama3: 0 gathers all of them in one go (fastest"
        " measured), a divisor of the KV heads gathers that many at a time, overlapped with compute, in less memory",
    )


@dataclass
class Checkpoint:
    enable: bool = option(False, "save resumable checkpoints and resume from the latest")
    folder: str = option("checkpoint", "checkpoint folder inside job.dump_folder")
    interval: int = option(500, "steps between checkpoints")
    keep_latest_k: int = option(10, "complete checkpoints kept; 0 keeps all")
    load_step: int = option(-1, "step to resume from; -1 resumes from the latest complete one")
    initial_load_path: str = option("", "weights to start from when no checkpoint exists yet")
    initial_load_in_hf: bool = option(False, "initial_load_path is a Hugging Face safetensors folder")
    last_save_in_hf: bool = option(
        False, "also export the final weights, config and tokenizer as a Hugging Face folder (dump_folder/hf)"
    )
    export_dtype: Literal["bfloat16", "float32"] = option("bfloat16", "dtype of the exported Hugging Face weights")


@dataclass
class ActivationCheckpoint:
    mode: Literal["auto", "none", "selective", "full", "full_except_attention"] = option(
        "auto",
        "recompute activations in backward: none (only the SwiGLU's pointwise ops), selective (norms and"
        " SwiGLU), full, full_except_attention (recomputes each block but keeps attention's output and"
        " LSE), or auto"
        " (the first of none, selective, full_except_attention, full whose memory estimate fits)",
    )
    offload: bool = option(
        False, "copy the activations each block keeps for backward to pinned host memory during forward"
        " and back ahead of the block's backward, on side streams",
    )


@dataclass
class Compile:
    enable: AutoBool = option("auto", "torch.compile each transformer block: true, false, or auto (on for CUDA, off on CPU)")


@dataclass
class Metrics:
    log_freq: int = option(10, "steps between metric records")
    enable_tensorboard: bool = option(
        False, "also write TensorBoard events to {job.dump_folder}/tb (needs the tensorboard extra)"
    )
    enable_wandb: bool = option(
        False, "also log to Weights & Biases, project from WANDB_PROJECT (needs the wandb extra)"
    )


@dataclass
class Comm:
    init_timeout_seconds: int = option(300, "timeout for process-group start and the first step")
    train_timeout_seconds: int = option(100, "timeout for each collective after the first step")


@dataclass
class Profiling:
    enable_profiling: bool = option(
        False, "trace one step every profiling.profile_freq steps with torch.profiler: a Chrome trace and a"
        " table of the ops that took the most time, per rank",
    )
    save_traces_folder: str = option(
        "profile_traces", "folder inside job.dump_folder for the traces (one iteration_{step} folder per traced step)"
    )
    profile_freq: int = option(100, "steps between traced steps; each traced step follows one warm-up step")


@dataclass
class Debug:
    seed: int = option(0, "seed for weights, data order and dropout-free randomness")
    deterministic: bool = option(False, "use deterministic algorithms (slower)")
    skip_memory_check: bool = option(
        False, "start even when the memory estimate says the run does not fit (the estimate is an upper bound)"
    )


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    float8: Float8 = field(default_factory=Float8)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    validation: Validation = field(default_factory=Validation)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    metrics: Metrics = field(default_factory=Metrics)
    comm: Comm = field(default_factory=Comm)
    profiling: Profiling = field(default_factory=Profiling)
    debug: Debug = field(default_factory=Debug)
