"""`run_train.sh CONFIG --help-memory`: the longest sequence that fits one GPU, and what to turn next.

Runs the memory estimate (titan_cp.memory) for the config at growing `training.seq_len`, without
building the model or touching a GPU, so it works on a laptop. The GPU's memory is the GPU's
own when one is visible, else `--device-memory-gib N`, else an H200's 139.8 GiB. FSDP's shard
degree follows parallelism.fsdp_shard_within_node on nodes of NGPU processes (run_train.sh's
processes per node), else of the GPUs visible, else of 8 (an H200 node).
"""

import copy
import os
import sys

import torch

from titan_cp.checkpoint.hf import load_hf_args
from titan_cp.config import load_config
from titan_cp.errors import UserError
from titan_cp.memory import FIXED_OVERHEAD_CUDA, GIB, MemoryEstimate, choose_ac_mode, estimate_for_config, needed_bytes
from titan_cp.models.llama3 import llama3_flavors
from titan_cp.parallel.parallel_dims import node_local_shard

H200_GIB = 139.8  # torch.cuda.get_device_properties(...).total_memory of an H200 (141 GB)
H200_NODE_GPUS = 8
LARGEST_SEQ_LEN = 1 << 27


def _levers(cfg) -> list[tuple[str, object]]:
    """Single changes that lower the peak per token, among those not already made."""
    levers: list[tuple[str, object]] = []
    if cfg.training.mlp_chunk_size == 0:
        levers.append(("training.mlp_chunk_size", 8192))
    # auto already falls back to full when nothing else fits.
    if cfg.activation_checkpoint.mode not in ("full", "auto"):
        levers.append(("activation_checkpoint.mode", "full"))
    if not cfg.activation_checkpoint.offload:
        levers.append(("activation_checkpoint.offload", True))
    if cfg.training.loss_chunk_size == 0 or cfg.training.loss_chunk_size > 1024:
        levers.append(("training.loss_chunk_size", 1024))
    if not cfg.training.enable_cpu_offload:
        levers.append(("training.enable_cpu_offload", True))
    if _fsdp_shard(cfg) < _fsdp_group(cfg):
        levers.append(("parallelism.fsdp_shard_within_node", False))
    levers.append(("parallelism.context_parallel_degree", 2 * cfg.parallelism.context_parallel_degree))
    return levers


def _with(cfg, key: str, value):
    changed = copy.deepcopy(cfg)
    section, name = key.split(".")
    setattr(getattr(changed, section), name, value)
    return changed


def _fsdp_group(cfg) -> int:
    """dp_shard x cp, with dp_shard -1 (the rest of a world the report does not know) taken as 1."""
    return max(1, cfg.parallelism.data_parallel_shard_degree) * cfg.parallelism.context_parallel_degree


def _processes_per_node() -> int:
    if os.environ.get("NGPU"):
        return int(os.environ["NGPU"])
    return torch.cuda.device_count() or H200_NODE_GPUS


def _fsdp_shard(cfg) -> int:
    """The ranks FSDP shards over, as ParallelDims.from_config decides them."""
    if cfg.parallelism.fsdp_shard_within_node:
        return node_local_shard(_fsdp_group(cfg), _processes_per_node())
    return _fsdp_group(cfg)


def _estimate_in_mode(model_args, cfg, seq_len: int, ac_mode: str) -> MemoryEstimate:
    cp = cfg.parallelism.context_parallel_degree
    return estimate_for_config(
        model_args, cfg, fsdp_shard=_fsdp_shard(cfg), cp=cp, on_gpu=True, seq_len=seq_len, ac_mode=ac_mode
    )


def _ac_mode(model_args, cfg, seq_len: int, capacity: int) -> str:
    """activation_checkpoint.mode, with auto resolved at `seq_len` by the device memory, as the
    trainer resolves it (the report does not know the host's memory)."""
    if cfg.activation_checkpoint.mode != "auto":
        return cfg.activation_checkpoint.mode
    return choose_ac_mode(
        lambda mode: needed_bytes(_estimate_in_mode(model_args, cfg, seq_len, mode), FIXED_OVERHEAD_CUDA) <= capacity
    )


def _estimate(model_args, cfg, seq_len: int, capacity: int) -> MemoryEstimate:
    return _estimate_in_mode(model_args, cfg, seq_len, _ac_mode(model_args, cfg, seq_len, capacity))


def longest_seq_len(model_args, cfg, capacity: int) -> int:
    """The longest training.seq_len (a multiple of 1024 x 2 x cp, as zigzag needs) that fits; 0 if none."""
    step = 1024 * 2 * cfg.parallelism.context_parallel_degree

    def fits(units: int) -> bool:
        return needed_bytes(_estimate(model_args, cfg, units * step, capacity), FIXED_OVERHEAD_CUDA) <= capacity

    low, high = 0, LARGEST_SEQ_LEN // step
    if fits(high):
        return high * step
    while high - low > 1:  # fits(low) holds (or low == 0), fits(high) does not
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low * step


def _device_memory(argv: list[str]) -> tuple[int, str, list[str]]:
    """(bytes, where the figure comes from, argv without --help-memory and --device-memory-gib)."""
    rest, gib = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--help-memory":
            continue
        if arg.startswith("--device-memory-gib"):
            text = arg.partition("=")[2] or next(args, "")
            try:
                gib = float(text)
            except ValueError:
                raise UserError(f"--device-memory-gib: expected a number of GiB, got {text!r}") from None
            if gib <= 0:
                raise UserError(f"--device-memory-gib: must be > 0, got {text}")
            continue
        rest.append(arg)
    if gib is not None:
        return int(gib * GIB), f"{gib:g} GiB (--device-memory-gib)", rest
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.total_memory / GIB:.1f} GiB ({props.name})", rest
    return int(H200_GIB * GIB), f"{H200_GIB} GiB (an H200; --device-memory-gib N for another GPU)", rest


def report(argv: list[str]) -> str:
    capacity, where, rest = _device_memory(argv)
    cfg = load_config(rest)
    if cfg.model.hf_assets_path:
        model_args = load_hf_args(cfg.model.hf_assets_path)
    elif cfg.model.flavor in llama3_flavors:
        model_args = llama3_flavors[cfg.model.flavor]
    else:
        raise UserError(f"model.flavor '{cfg.model.flavor}' is not known; valid: {', '.join(llama3_flavors)}")
    cp = cfg.parallelism.context_parallel_degree
    lines = [
        f"memory per GPU: {where}; model {cfg.model.flavor}, cp {cp}, local batch {cfg.training.local_batch_size},"
        f" FSDP shards over {_fsdp_shard(cfg)} GPUs"
    ]

    current = longest_seq_len(model_args, cfg, capacity)
    mode = _ac_mode(model_args, cfg, cfg.training.seq_len, capacity)
    estimate = _estimate_in_mode(model_args, cfg, cfg.training.seq_len, mode)
    verdict = "fits" if needed_bytes(estimate, FIXED_OVERHEAD_CUDA) <= capacity else "does NOT fit"
    auto = f" (activation_checkpoint.mode auto: {mode})" if cfg.activation_checkpoint.mode == "auto" else ""
    lines.append(f"training.seq_len {cfg.training.seq_len:,} {verdict}{auto}: {estimate.format()}")
    lines.append(f"longest training.seq_len that fits: {current:,}")
    gains = []
    for key, value in _levers(cfg):
        changed = _with(cfg, key, value)
        longest = longest_seq_len(model_args, changed, capacity)
        host = _estimate(model_args, changed, max(longest, 1024 * 2 * cp), capacity).host
        gains.append((longest, key, value, host))
    gains.sort(key=lambda gain: -gain[0])
    lines.append("one change at a time, longest first:")
    for longest, key, value, host in gains:
        value_text = str(value).lower() if isinstance(value, bool) else value
        host_text = f" (host memory {host / GIB:.1f} GiB)" if host else ""
        gpus = " (twice the GPUs)" if key == "parallelism.context_parallel_degree" else ""
        lines.append(f"  --{key} {value_text}: {longest:,}{gpus}{host_text}")
    # More cp ranks always help but need more GPUs: recommend it only when nothing else does.
    same_gpus = [gain for gain in gains if gain[1] != "parallelism.context_parallel_degree"]
    best = same_gpus[0] if same_gpus and same_gpus[0][0] > current else gains[0]
    if best[0] > current:
        longest, key, value, _ = best
        value_text = str(value).lower() if isinstance(value, bool) else value
        lines.append(f"next lever: --{key} {value_text} ({current:,} -> {longest:,} tokens)")
    else:
        lines.append("next lever: none of the single changes above lengthens the sequence")
    everything = cfg
    for _, key, value, _ in same_gpus:
        everything = _with(everything, key, value)
    lines.append(
        f"with all of them on the same GPUs: {longest_seq_len(model_args, everything, capacity):,} tokens"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    try:
        text = report(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # the reader (say, `| head`) stopped early
        sys.stderr.close()


if __name__ == "__main__":
    main()
