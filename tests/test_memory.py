"""The memory estimate against real tensors: parameter counts, optimizer state, saved activations."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from titan_cp import memory
from titan_cp.errors import UserError
from titan_cp.memory import MemoryEstimate, check_fits, count_params, estimate_memory
from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import RotaryEmbedding, Transformer, TransformerBlock, sdpa_causal_attention
from titan_cp.parallel.parallelize import checkpoint_block

DEBUG = llama3_flavors["debugmodel"]


@pytest.mark.parametrize(
    "flavor, expected", [("8B", 8.030e9), ("70B", 70.554e9), ("405B", 405.853e9)]
)
def test_param_count_matches_published_sizes(flavor, expected):
    total = count_params(llama3_flavors[flavor]).total
    assert total == pytest.approx(expected, rel=1e-3)
    assert total == llama3_flavors[flavor].num_params()


@pytest.mark.parametrize("tied", [False, True])
def test_params_grads_optimizer_match_real_tensors(tied):
    args = dataclasses.replace(DEBUG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == count_params(args).total
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


def _saved_bytes_per_token(mode: str, dtype: torch.dtype) -> float:
    """Bytes autograd keeps for one block's backward, measured with saved-tensor hooks."""
    batch, seq = 2, 64
    torch.manual_seed(0)
    block = TransformerBlock(0, DEBUG, sdpa_causal_attention).to(dtype)
    checkpoint_block(block, mode)
    rope = RotaryEmbedding(DEBUG)
    rope.reset()
    cos, sin = rope(torch.arange(seq).expand(batch, seq))
    # Weights and the RoPE tables are not activations: the estimate counts them elsewhere.
    excluded = {t.untyped_storage().data_ptr() for t in (*block.parameters(), cos, sin)}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, seq, DEBUG.dim, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, None)
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
    chunked = memory.loss_chunk_bytes(args, 65536, 4096, 2)
    assert chunked == 4096 * args.vocab_size * (2 + 3 * 4)
    assert memory.loss_chunk_bytes(args, 65536, 0, 2) == 65536 // 4096 * chunked
    # Without chunks the logits are the largest transient of the step.
    assert estimate_memory(args, 131072, 1, 8, 2, "full", 2, 0).backward_peak > 16 * chunked


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
