"""The memory estimate against real tensors: parameter counts, optimizer state, saved activations."""

import dataclasses
import gc
import subprocess
from types import SimpleNamespace

import pytest
import torch

from titan_cp import memory
from titan_cp.errors import UserError
from titan_cp.config import load_config
from titan_cp.memory import MemoryEstimate, check_fits, count_params, estimate_for_config, estimate_memory
from titan_cp.memory_report import longest_seq_len, report
from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import RotaryEmbedding, Transformer, TransformerBlock, sdpa_causal_attention
from titan_cp.parallel import ParallelDims
from titan_cp.parallel.parallelize import checkpoint_block
from tests.train_utils import REPO, TINY, run_train

DEBUG = llama3_flavors["debugmodel"]


@pytest.mark.parametrize(
    "flavor, expected", [("8B", 8.030e9), ("70B", 70.554e9), ("405B", 405.853e9)]
)
def test_param_count_matches_published_sizes(flavor, expected):
    assert count_params(llama3_flavors[flavor]).total == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_params_grads_optimizer_match_real_tensors(tied):
    args = dataclasses.replace(DEBUG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == count_params(args).total
    assert sum(p.numel() for p in model.layers["0"].parameters()) == count_params(args).per_block
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    model(tokens, labels=tokens).backward()
    optimizer.step()

    real = sum(p.numel() * p.element_size() for p in model.parameters())
    real += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    real += sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    est = estimate_memory(args, 16, 1, 1, 1, "none", 4, 0)
    assert est.gathered_params_peak == 0  # fp32 without sharding: parameters used in place
    assert est.params + est.grads + est.optimizer == pytest.approx(real, rel=0.02)


def test_sharding_divides_the_fp32_state():
    one = estimate_memory(DEBUG, 64, 1, 1, 1, "full", 2, 0)
    eight = estimate_memory(DEBUG, 64, 1, 8, 1, "full", 2, 0)
    for field in ("params", "grads", "optimizer"):
        assert getattr(eight, field) == pytest.approx(getattr(one, field) / 8, rel=1e-6)


def test_explicit_prefetch_adds_gathered_blocks():
    """parallelism.fsdp_prefetch N holds N + 1 gathered blocks; 0 and 1 keep FSDP2's two."""
    block_bf16 = count_params(DEBUG).per_block * 2
    peak = {n: estimate_memory(DEBUG, 64, 1, 8, 1, "full", 2, 0, fsdp_prefetch=n).gathered_params_peak for n in (0, 1, 3)}
    assert peak[1] == peak[0]
    assert peak[3] - peak[0] == block_bf16 * 2


def _live_tensors() -> list[torch.Tensor]:
    gc.collect()  # unreachable cycles are not kept
    # type(), not isinstance(): some objects warn when asked for their __class__.
    return [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor)]


def _saved_bytes_per_token(mode: str, dtype: torch.dtype) -> float:
    """Bytes one block keeps for its backward: what autograd saves (saved-tensor hooks) and what
    checkpointing holds itself (a selective-checkpoint region's kept outputs, a checkpoint's
    inputs), found as the tensors still alive after the forward."""
    batch, seq = 2, 64
    torch.manual_seed(0)
    block = TransformerBlock(0, DEBUG, sdpa_causal_attention).to(dtype)
    checkpoint_block(block, mode)
    rope = RotaryEmbedding(DEBUG)
    rope.reset()
    cos, sin = rope(torch.arange(seq).expand(batch, seq))
    # Weights and the RoPE tables are not activations: the estimate counts them elsewhere.
    excluded = {t.untyped_storage().data_ptr() for t in (*block.parameters(), cos, sin)}
    x = torch.randn(batch, seq, DEBUG.dim, dtype=dtype, requires_grad=True)
    # Held, so that no new tensor can reuse the id of one of these.
    alive_before = _live_tensors()
    ids_before = {id(t) for t in alive_before}
    storages: dict[int, int] = {}

    def note(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        out = block(x, cos, sin, None)
    excluded.add(out.untyped_storage().data_ptr())
    for t in _live_tensors():
        # Not the random-number-generator state a checkpoint keeps (bytes, not per token).
        if id(t) not in ids_before and t.is_floating_point():
            note(t)
    return sum(storages.values()) / (batch * seq)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_activations_match_autograd(mode, dtype):
    kept = memory._kept_bytes_per_token(DEBUG, dtype.itemsize, mode)
    assert kept == pytest.approx(_saved_bytes_per_token(mode, dtype), rel=0.05)


def test_activations_scale_with_local_length_and_checkpointing():
    def act(seq_len, cp, mode):
        return estimate_memory(llama3_flavors["8B"], seq_len, 1, 8, cp, mode, 2, 4096).activations

    assert act(131072, 1, "full") < act(131072, 1, "selective") < act(131072, 1, "none")
    # cp=2 halves the local tokens; only the (small) cp workspace is added.
    assert act(131072, 2, "full") == pytest.approx(act(65536, 1, "full"), rel=0.1)
    assert act(131072, 2, "full") < 0.6 * act(131072, 1, "full")


def test_loss_chunk_bounds_logit_memory():
    args = llama3_flavors["8B"]

    def loss(local_tokens: int, chunk: int) -> int:
        return memory.loss_chunk_bytes(args, local_tokens, chunk, 2)

    # Chunked: bounded by the chunk, whatever the sequence; unchunked: grows with the local tokens
    # (65536 here, 16 chunks of 4096).
    assert loss(65536, 4096) == loss(131072, 4096) == 2 * loss(65536, 2048)
    assert loss(131072, 0) == 2 * loss(65536, 0)
    assert loss(65536, 0) == 16 * loss(65536, 4096)
    # Without chunks the logits are the largest transient of the step.
    assert estimate_memory(args, 131072, 1, 8, 2, "full", 2, 0).backward_peak > loss(65536, 0)


def test_unknown_ac_mode_is_a_user_error():
    with pytest.raises(UserError, match="activation_checkpoint.mode"):
        estimate_memory(DEBUG, 64, 1, 1, 1, "some", 4, 0)


def test_8b_refused_on_this_cpu_debug_fits():
    with pytest.raises(UserError) as err:
        check_fits(estimate_memory(llama3_flavors["8B"], 8192, 1, 1, 1, "full", 4, 4096), torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message
    for hint in ("GiB RAM available", "context_parallel_degree", "activation_checkpoint.mode full", "seq_len"):
        assert hint in message
    check_fits(estimate_memory(DEBUG, 2048, 8, 1, 1, "none", 4, 4096), torch.device("cpu"))


def test_cpu_ranks_share_the_ram(monkeypatch):
    monkeypatch.setattr(memory, "_cpu_available_bytes", lambda: 10 * memory.GIB)
    estimate = MemoryEstimate(params=4 * memory.GIB, grads=0, optimizer=0, gathered_params_peak=0, activations=0, backward_peak=0)
    check_fits(estimate, torch.device("cpu"))
    with pytest.raises(UserError, match="for each of 2 local ranks"):
        check_fits(estimate, torch.device("cpu"), ranks_sharing_device=2)


def test_h200_verdicts_for_8b_at_128k(monkeypatch):
    """On a 141 GiB H200, 8B at 128K over cp=2 fits with full checkpointing, not with selective."""
    h200 = SimpleNamespace(name="NVIDIA H200", total_memory=int(139.8 * memory.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    args, cuda = llama3_flavors["8B"], torch.device("cuda", 0)
    check_fits(estimate_memory(args, 131072, 1, 2, 2, "full", 2, 4096), cuda)
    with pytest.raises(UserError, match="NVIDIA H200 has 139.8 GiB"):
        check_fits(estimate_memory(args, 131072, 1, 2, 2, "selective", 2, 4096), cuda)


def test_70b_sharded_within_nodes_of_8_h200s_is_refused_naming_the_key(monkeypatch):
    """70B at 128K, cp 16 on 2 nodes of 8 H200s: its 16 bytes per parameter over one node's 8 ranks
    do not fit; over all 16 they do, so the refusal names parallelism.fsdp_shard_within_node."""
    h200 = SimpleNamespace(name="NVIDIA H200", total_memory=int(139.8 * memory.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    cuda = torch.device("cuda", 0)
    cfg = load_config(["--model.flavor", "70B", "--training.seq_len", "131072", "--training.local_batch_size", "1",
                       "--activation_checkpoint.mode", "full", "--parallelism.context_parallel_degree", "16"])  # fmt: skip

    def dims_and_estimate(within_node: bool):
        parallelism = dataclasses.replace(cfg.parallelism, fsdp_shard_within_node=within_node)
        dims = ParallelDims.from_config(parallelism, world_size=16, processes_per_node=8)
        return dims, estimate_for_config(llama3_flavors["70B"], cfg, dims.fsdp_shard, dims.cp, on_gpu=True)

    node_local, estimate = dims_and_estimate(True)
    assert node_local.fsdp_shard == 8
    with pytest.raises(UserError) as err:
        check_fits(estimate, cuda, first_lever=node_local.wider_sharding_lever())
    assert "\n" not in str(err.value)
    assert "would help" in str(err.value) and "parallelism.fsdp_shard_within_node false" in str(err.value)
    across, estimate = dims_and_estimate(False)
    assert across.fsdp_shard == 16 and across.wider_sharding_lever() == ""
    check_fits(estimate, cuda)


# Peaks measured on H200s (torch.cuda.max_memory_allocated over 2-3 steps, docs/memory.md):
# (flavor, layers, seq_len, FSDP ranks, cp, AC mode, loss chunk, mlp chunk, offload, compiled, GiB).
# The 512K compiled row is step 1's peak plus the optimizer state step 2 adds (that run died in step 2).
MEASURED = [
    ("8B", 32, 65536, 2, 2, "selective", 2048, 0, False, False, 106.9),
    ("8B", 32, 65536, 2, 2, "full", 2048, 0, False, False, 70.5),
    ("8B", 32, 131072, 2, 2, "full", 2048, 0, False, False, 82.7),
    ("8B", 32, 262144, 2, 2, "full", 2048, 0, False, False, 115.5),
    ("1B", 16, 16384, 1, 1, "none", 4096, 0, False, False, 39.73),
    ("1B", 16, 16384, 2, 2, "none", 4096, 0, False, False, 23.37),
    ("1B", 16, 262144, 1, 1, "full", 4096, 0, False, True, 75.5),
    ("1B", 16, 524288, 1, 1, "full", 4096, 0, False, True, 126.8 + 9.21),
    ("1B", 8, 131072, 1, 1, "full", 4096, 0, False, False, 31.58),
    ("1B", 8, 131072, 1, 1, "full", 4096, 8192, True, False, 21.54),
    ("1B", 1, 1048576, 1, 1, "full", 4096, 8192, True, False, 83.27),
    ("8B", 1, 524288, 1, 1, "full", 4096, 8192, True, False, 96.24),
    ("1B", 16, 524288, 1, 1, "full_except_attention", 4096, 8192, True, False, 89.07),
]


@pytest.mark.parametrize("row", MEASURED, ids=lambda row: f"{row[0]}-{row[1]}L-{row[2] // 1024}K-{row[5]}-mlp{row[7]}-off{int(row[8])}")
def test_estimate_within_10_percent_of_measured_peaks(row):
    """Every measured peak is within 10% of its estimate, and the estimate with its margin is
    above the measured peak, so a run the check admits did fit."""
    flavor, layers, seq_len, ranks, cp, mode, loss_chunk, mlp_chunk, offload, compiled, measured = row
    args = dataclasses.replace(llama3_flavors[flavor], n_layers=layers)
    estimate = estimate_memory(
        args, seq_len, 1, ranks, cp, mode, 2, loss_chunk,
        mlp_chunk_size=mlp_chunk, activation_offload=offload, compiled=compiled,
    )  # fmt: skip
    assert estimate.total / memory.GIB == pytest.approx(measured, rel=0.10)
    assert memory.needed_bytes(estimate, memory.FIXED_OVERHEAD_CUDA) / memory.GIB > measured


def test_offload_keeps_two_blocks_on_the_device():
    args = llama3_flavors["1B"]
    plain = estimate_memory(args, 131072, 1, 1, 1, "full", 2, 4096)
    offloaded = estimate_memory(args, 131072, 1, 1, 1, "full", 2, 4096, activation_offload=True)
    per_block = 131072 * args.dim * 2
    rope = 131072 * 2 * args.head_dim * 4
    assert plain.activations == args.n_layers * per_block + rope
    assert offloaded.activations == 2 * per_block + rope
    assert offloaded.host == args.n_layers * per_block
    assert offloaded.backward_peak == plain.backward_peak


def test_offload_leaves_mode_nones_kept_swiglu_inputs_on_the_device():
    """Mode none's selective-checkpoint region caches w1's and w3's outputs outside the offload
    hooks (tests/test_long_sequence.py shows it): every block keeps them on the device."""
    args = llama3_flavors["1B"]
    plain = estimate_memory(args, 131072, 1, 1, 1, "none", 2, 4096)
    offloaded = estimate_memory(args, 131072, 1, 1, 1, "none", 2, 4096, activation_offload=True)
    swiglu = 131072 * 2 * args.ffn_hidden_dim * 2
    per_block = plain.activations_last_block - 131072 * 2 * args.head_dim * 4
    assert offloaded.host == args.n_layers * (per_block - swiglu)
    assert offloaded.activations == plain.activations - (args.n_layers - 2) * (per_block - swiglu)


def test_offload_leaves_the_cached_attention_outputs_on_the_device():
    """full_except_attention's attention outputs are cached outside the offload hooks
    (tests/test_long_sequence.py shows it): every block keeps them on the device."""
    args = llama3_flavors["1B"]
    plain = estimate_memory(args, 131072, 1, 1, 1, "full_except_attention", 2, 4096)
    offloaded = estimate_memory(args, 131072, 1, 1, 1, "full_except_attention", 2, 4096, activation_offload=True)
    block_input = 131072 * args.dim * 2
    per_block = plain.activations_last_block - 131072 * 2 * args.head_dim * 4
    attention_output = per_block - block_input
    assert attention_output > 0
    assert offloaded.host == args.n_layers * block_input
    assert offloaded.activations == plain.activations - (args.n_layers - 2) * block_input


def test_tiled_mlp_removes_the_ffn_width_from_the_backward():
    args, tokens = llama3_flavors["1B"], 1 << 20
    untiled = memory._block_backward_bytes(args, 2, "full", 1, tokens, 0)
    tiled = memory._block_backward_bytes(args, 2, "full", 1, tokens, 8192)
    assert untiled - tiled > tokens * 5 * args.ffn_hidden_dim * 2
    # A chunk as long as the local sequence is no tiling at all.
    assert memory._block_backward_bytes(args, 2, "full", 1, tokens, tokens) == untiled


def test_cpu_offload_moves_the_model_state_to_the_host():
    args = llama3_flavors["8B"]
    on_device = estimate_memory(args, 65536, 1, 2, 2, "full", 2, 2048)
    offloaded = estimate_memory(args, 65536, 1, 2, 2, "full", 2, 2048, cpu_offload=True)
    assert offloaded.params == offloaded.grads == offloaded.optimizer == 0
    assert offloaded.host == on_device.params + on_device.grads + on_device.optimizer
    assert offloaded.gathered_params_peak > on_device.gathered_params_peak  # fp32 shards staged on the device


def test_the_run_that_died_in_step_2_is_refused_and_fits_with_the_levers(monkeypatch):
    """1B at 512K, full checkpointing, compiled, one H200: it passed the old estimate, peaked at
    126.8 GiB in step 1 and ran out of memory in step 2. Now refused; tiling and offload admit it."""
    h200 = SimpleNamespace(name="NVIDIA H200", total_memory=int(139.8 * memory.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h200)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(memory, "_cpu_available_bytes", lambda: 120 * memory.GIB)
    args, cuda = llama3_flavors["1B"], torch.device("cuda", 0)
    with pytest.raises(UserError, match="mlp_chunk_size"):
        check_fits(estimate_memory(args, 524288, 1, 1, 1, "full", 2, 4096, compiled=True), cuda)
    check_fits(
        estimate_memory(args, 524288, 1, 1, 1, "full", 2, 4096, compiled=True, mlp_chunk_size=8192, activation_offload=True),
        cuda,
    )
    # Offloaded activations that do not fit the host's RAM are refused too.
    monkeypatch.setattr(memory, "_cpu_available_bytes", lambda: 10 * memory.GIB)
    with pytest.raises(UserError, match="host memory"):
        check_fits(estimate_memory(args, 524288, 1, 1, 1, "full", 2, 4096, activation_offload=True), cuda)


def _help_memory(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/run_train.sh", "train_configs/debug_model.toml", "--model.flavor", "1B",
         "--training.local_batch_size", "1", "--activation_checkpoint.mode", "full", *overrides, "--help-memory"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_help_memory_prints_the_longest_fit_and_the_next_lever():
    """No GPU here: an H200's memory is assumed; the longest length is the fit boundary."""
    result = _help_memory("--training.seq_len", "524288", "--compile.enable", "true")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "139.8 GiB (an H200" in lines[0]
    assert "524,288 does NOT fit" in lines[1]
    longest = int(next(l for l in lines if l.startswith("longest")).split(": ")[1].replace(",", ""))
    cfg = load_config(["--job.config_file", "train_configs/debug_model.toml", "--model.flavor", "1B",
                       "--training.local_batch_size", "1", "--activation_checkpoint.mode", "full", "--compile.enable", "true"])  # fmt: skip
    capacity = int(139.8 * memory.GIB)
    assert longest == longest_seq_len(llama3_flavors["1B"], cfg, capacity)
    fits = lambda s: memory.needed_bytes(estimate_for_config(llama3_flavors["1B"], cfg, 1, 1, True, s), memory.FIXED_OVERHEAD_CUDA) <= capacity  # noqa: E731
    assert fits(longest) and not fits(longest + 2048)
    assert any(l.startswith("next lever: --training.mlp_chunk_size 8192") for l in lines), result.stdout
    smaller = _help_memory("--device-memory-gib", "80")
    assert "80 GiB (--device-memory-gib)" in smaller.stdout
    bad = _help_memory("--device-memory-gib", "lots")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--device-memory-gib" in bad.stderr


def test_help_memory_uses_the_node_local_shard_degree_and_offers_sharding_across(monkeypatch):
    """NGPU is run_train.sh's processes per node: cp 16 on nodes of 8 shards over 8 GPUs."""
    seventy_b = ["--model.flavor", "70B", "--training.seq_len", "131072", "--training.local_batch_size", "1",
                 "--activation_checkpoint.mode", "full", "--parallelism.context_parallel_degree", "16"]  # fmt: skip
    monkeypatch.setenv("NGPU", "8")
    text = report(seventy_b)
    assert "FSDP shards over 8 GPUs" in text.splitlines()[0]
    assert "131,072 does NOT fit" in text
    assert "  --parallelism.fsdp_shard_within_node false: " in text
    monkeypatch.setenv("NGPU", "16")
    text = report(seventy_b)
    assert "FSDP shards over 16 GPUs" in text.splitlines()[0]
    assert "131,072 fits" in text and "fsdp_shard_within_node" not in text


@pytest.mark.parametrize("seq_len", [65536, 131072, 524288])
def test_auto_checkpointing_takes_the_fastest_mode_that_fits(seq_len, monkeypatch):
    """auto walks none, selective, full_except_attention, full and stops at the first that fits
    an H200 (the 1B, compiled); --help-memory reports the same choice."""
    capacity = int(139.8 * memory.GIB)

    def fits(mode):
        estimate = estimate_memory(llama3_flavors["1B"], seq_len, 1, 1, 1, mode, 2, 4096, compiled=True)
        return memory.needed_bytes(estimate, memory.FIXED_OVERHEAD_CUDA) <= capacity

    fitting = [mode for mode in memory.AC_MODES_FASTEST_FIRST if fits(mode)]
    chosen = memory.choose_ac_mode(fits)
    assert chosen == (fitting[0] if fitting else "full")
    # Each mode is smaller than the one before it, so auto never skips a faster fitting mode.
    sizes = [estimate_memory(llama3_flavors["1B"], seq_len, 1, 1, 1, m, 2, 4096).total for m in memory.AC_MODES_FASTEST_FIRST]
    assert sizes == sorted(sizes, reverse=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # an H200's memory, as above
    text = report(["--job.config_file", str(REPO / "train_configs" / "debug_model.toml"), "--model.flavor", "1B",
                   "--training.local_batch_size", "1", "--training.seq_len", str(seq_len), "--compile.enable", "true"])  # fmt: skip
    assert f"(activation_checkpoint.mode auto: {chosen})" in text.splitlines()[1]


def test_the_trainer_resolves_auto_before_building(tmp_path):
    """The default mode is auto; the tiny CPU run fits without recomputation, and says so."""
    result = run_train(tmp_path, *TINY, "--training.steps", "1", ngpu=2)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    chosen = [l for l in lines if "activation_checkpoint.mode auto: none" in l]
    assert len(chosen) == 1 and lines.index(chosen[0]) < next(i for i, l in enumerate(lines) if "memory estimate per device" in l)
