"""Tiled MLP and activation offload: same losses and gradients as the plain model, and the
memory they promise (no full-length [S, ffn_dim] tensor; what checkpointing keeps leaves the block).
"""

import dataclasses
import subprocess
import sys

import pytest
import torch
# Private module path, but the documented way to see every op's output (torch has no public
# alias); if it moves, the import fails loudly and the tiling test with it.
from torch.utils._python_dispatch import TorchDispatchMode

from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import Transformer
from titan_cp.parallel.activation_offload import apply_activation_offload
from titan_cp.parallel.parallelize import apply_activation_checkpointing
from tests.train_utils import REPO, TINY, assert_close_losses, read_metrics, run_train, train_losses

DEBUG = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=3)
BATCH, SEQ = 2, 40


def _model(mode: str, mlp_chunk_size: int = 0, offload: bool = False):
    torch.manual_seed(0)
    model = Transformer(DEBUG)
    apply_activation_checkpointing(model, mode, mlp_chunk_size)
    offloader = apply_activation_offload(list(model.layers.values()), torch.device("cpu")) if offload else None
    return model, offloader


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, DEBUG.vocab_size, (BATCH, SEQ + 1), generator=generator)
    loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_chunk_size=16)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(_model("none")[0])


def _assert_same(actual, expected):
    loss, grads = actual
    ref_loss, ref_grads = expected
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "mode, mlp_chunk_size, offload",
    [("none", 7, False), ("none", 0, True), ("selective", 7, False), ("full", 0, True), ("selective", 0, True), ("full", 16, True)],
)
def test_same_loss_and_grads(mode, mlp_chunk_size, offload, reference):
    """Chunks of 7 and 16 tokens leave a shorter last chunk (40 = 5 x 7 + 5 = 2 x 16 + 8)."""
    _assert_same(_loss_and_grads(_model(mode, mlp_chunk_size, offload)[0]), reference)


class _FfnWidths(TorchDispatchMode):
    """Records the token count of every tensor an op creates with the feed-forward's width."""

    def __init__(self):
        super().__init__()
        self.tokens: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            weight_like = tuple(t.shape) == (DEBUG.dim, DEBUG.ffn_hidden_dim) if isinstance(t, torch.Tensor) else True
            if not weight_like and t.dim() >= 2 and t.shape[-1] == DEBUG.ffn_hidden_dim:
                self.tokens.append(t.numel() // t.shape[-1])
        return out


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_tiled_mlp_never_holds_the_whole_sequence(mode):
    """Forward and backward (with its recomputation) create [tokens, ffn_dim] tensors of at most
    one chunk; untiled, the same probe sees all BATCH x SEQ tokens at once."""
    for chunk, largest in ((0, BATCH * SEQ), (8, BATCH * 8)):
        model, _ = _model(mode, chunk)
        with _FfnWidths() as probe:
            _loss_and_grads(model)
        assert max(probe.tokens) == largest, (chunk, sorted(set(probe.tokens)))


def test_offload_takes_what_checkpointing_keeps():
    """Under full checkpointing a block keeps only its input, and it goes through the offload
    hooks (torch's non-reentrant checkpoint saves its inputs as saved tensors; if a torch release
    stops doing so, this fails). The RoPE tables and the parameters stay in place."""
    model, offloader = _model("full", offload=True)
    groups = []
    original_fetch = offloader._fetch

    def record(group):
        if group not in groups:
            groups.append(group)
        original_fetch(group)

    offloader._fetch = record
    _loss_and_grads(model)
    assert len(groups) == DEBUG.n_layers  # every block's tensors came back, last block first
    for group in groups:
        assert [tuple(s.shape) for s in group.saved] == [(BATCH, SEQ, DEBUG.dim)]
    assert groups[0].previous is groups[1]  # backward fetches block L-2 while block L-1 runs


def _packed_shapes(mode: str) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, moved to the host) of every tensor the offload hooks saw in one step in `mode`."""
    model, offloader = _model(mode, offload=True)
    seen = []
    original_pack = offloader._pack

    def record(t, group, shared):
        packed = original_pack(t, group, shared)
        seen.append((tuple(t.shape), packed is not t))
        return packed

    offloader._pack = record
    _loss_and_grads(model)
    return seen


def test_offload_under_full_except_attention_moves_only_the_block_input():
    """Selective checkpointing caches the attention kernel's outputs itself, not as autograd
    saved tensors, so the offload hooks see only each block's input; the memory estimate keeps
    those outputs on the device (titan_cp.memory). If a torch release routes them through the
    hooks, this fails and the estimate can move them to the host."""
    moved = [shape for shape, was_moved in _packed_shapes("full_except_attention") if was_moved]
    assert moved == [(BATCH, SEQ, DEBUG.dim)] * DEBUG.n_layers


def test_offload_under_mode_none_leaves_the_kept_swiglu_inputs():
    """Mode none's SwiGLU region caches w1's and w3's outputs itself, so the offload hooks never
    see a tensor of the hidden width; the memory estimate keeps them on the device."""
    moved = [shape for shape, was_moved in _packed_shapes("none") if was_moved]
    assert moved and all(shape[-1] != DEBUG.ffn_hidden_dim for shape in moved)


def test_selective_offload_moves_attention_tensors():
    """Selective checkpointing keeps q, k, v, the attention output and the norms' inputs: all
    of them leave the block; the shared RoPE tables ([B, S, 1, head_dim]) do not."""
    seen = _packed_shapes("selective")
    moved = {shape for shape, was_moved in seen if was_moved}
    kept = {shape for shape, was_moved in seen if not was_moved}
    head_dim = DEBUG.head_dim
    assert (BATCH, SEQ, DEBUG.dim) in moved
    assert (BATCH, SEQ, DEBUG.n_kv_heads, head_dim) in moved or (BATCH, DEBUG.n_kv_heads, SEQ, head_dim) in moved
    assert (BATCH, SEQ, 1, head_dim) in kept and (BATCH, SEQ, 1, head_dim) not in moved


STEPS = ["--training.steps", "3", "--training.local_batch_size", "1", "--training.global_batch_size", "2"]


@pytest.fixture(scope="module")
def trainer_losses(tmp_path_factory) -> list[float]:
    return train_losses(tmp_path_factory.mktemp("plain"), *STEPS)


def test_trainer_with_every_lever_keeps_the_losses(trainer_losses, tmp_path):
    """Offload, tiling and full checkpointing through the trainer (via the reduced-depth script
    at the debug model's own depth), against the plain launcher run."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_reduced_depth.py"), str(llama3_flavors["debugmodel"].n_layers),
         "--job.config_file", "train_configs/debug_model.toml", "--model.flavor", f"debugmodel-{llama3_flavors['debugmodel'].n_layers}L",
         "--job.dump_folder", str(tmp_path), *TINY, *STEPS, "--activation_checkpoint.mode", "full",
         "--activation_checkpoint.offload", "true", "--training.mlp_chunk_size", "24"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_losses([r["loss"] for r in read_metrics(tmp_path)], trainer_losses, rtol=1e-5)


def test_cpu_offload_keeps_the_losses(trainer_losses, tmp_path):
    """FSDP2's CPUOffloadPolicy over 2 ranks: the optimizer step and clipping run on host shards."""
    losses = train_losses(tmp_path, *STEPS, "--training.enable_cpu_offload", "true", ngpu=2)
    assert_close_losses(losses, trainer_losses, rtol=1e-4)


def test_out_of_memory_in_a_step_is_one_line_on_every_rank(tmp_path):
    """Rank 1 alone runs out of memory (injected, tests/oom_injection): the launcher exits
    non-zero with one line naming the levers, and no traceback from any rank or torchrun."""
    env = {"PYTHONPATH": f"{REPO / 'tests' / 'oom_injection'}:{REPO}", "TITAN_CP_TEST_OOM_RANK": "1"}
    result = run_train(tmp_path, *TINY, "--training.steps", "3", ngpu=2, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of memory on rank 1" in errors[0], result.stderr
    for lever in ("mlp_chunk_size", "activation_checkpoint.offload", "activation_checkpoint.mode full",
                  "loss_chunk_size", "context_parallel_degree", "enable_cpu_offload", "--help-memory"):  # fmt: skip
        assert lever in errors[0]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_offload_on_gpu_moves_to_pinned_memory_and_back(mode):
    """On CUDA the saved tensors go to pinned host memory on side streams and come back: same
    loss and gradients as the plain model (fp32, same kernels), and the device keeps less."""
    device = torch.device("cuda")
    results, kept = [], []
    for offload in (False, True):
        torch.manual_seed(0)
        model = Transformer(DEBUG).to(device)
        apply_activation_checkpointing(model, mode, mlp_chunk_size=16)
        if offload:
            apply_activation_offload(list(model.layers.values()), device)
        tokens = torch.randint(0, DEBUG.vocab_size, (BATCH, 4096 + 1), device=device, generator=torch.Generator(device).manual_seed(1))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_chunk_size=1024)
        torch.cuda.synchronize()
        # Memory the copy stream read (record_stream) is released once its event has completed;
        # empty_cache waits for those events and frees the blocks, so the reading is not timing-dependent.
        torch.cuda.empty_cache()
        kept.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    _assert_same(results[1], results[0])
    assert kept[1] < kept[0]
