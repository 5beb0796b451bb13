"""AdamW parameter groups and the warmup-stable-decay schedule against hand-computed values."""

import math
import pickle

import pytest
import torch
from torch import nn

from tests.dist_utils import run_distributed
from titan_cp.config.schema import LRScheduler, Optimizer
from titan_cp.optim import build_lr_scheduler, build_optimizer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.norm = nn.RMSNorm(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.frozen = nn.Linear(4, 4, bias=False)
        self.frozen.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.emb(tokens)))


def lrs(warmup: int, total: int, decay_ratio: float = -1.0, decay_type: str = "linear",
        min_lr_factor: float = 0.0, steps: int | None = None) -> list[float]:
    """The lr each optimizer step runs at (base lr 1.0), read from the optimizer as a trainer would."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = LRScheduler(warmup_steps=warmup, decay_ratio=decay_ratio, decay_type=decay_type,
                      min_lr_factor=min_lr_factor)
    sched = build_lr_scheduler(opt, cfg, total)
    seen = []
    for _ in range(total if steps is None else steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


# --- optimizer ---


def test_decay_only_on_parameters_with_two_or_more_dims():
    model = Tiny()
    opt = build_optimizer(model, Optimizer(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model.emb.weight), id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.norm.weight), id(model.proj.bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for group in opt.param_groups:  # the frozen weight is in neither group
        assert group["lr"] == 1e-3 and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6


def test_weight_decay_shrinks_matrices_and_leaves_vectors():
    # With zero gradients Adam's update is zero, so only decoupled decay moves a parameter:
    # p <- p * (1 - lr * wd) for decayed parameters, unchanged for the rest.
    torch.manual_seed(0)
    model = Tiny()
    nn.init.normal_(model.norm.weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, Optimizer(lr=0.5, weight_decay=0.2))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name in ("emb.weight", "proj.weight"):
        torch.testing.assert_close(model.get_parameter(name), before[name] * (1 - 0.5 * 0.2))
    for name in ("norm.weight", "proj.bias", "frozen.weight"):
        torch.testing.assert_close(model.get_parameter(name), before[name], rtol=0, atol=0)


def test_model_with_only_matrices_gets_one_group():
    opt = build_optimizer(nn.Linear(3, 3, bias=False), Optimizer())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == Optimizer().weight_decay


def _fsdp_step(rank: int, world_size: int, state: dict, batch: torch.Tensor) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    model = Tiny()
    model.load_state_dict(state)
    fully_shard(model.proj, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model, Optimizer(lr=0.1, weight_decay=0.3))
    decay, no_decay = opt.param_groups
    assert all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
    assert sorted(tuple(p.shape) for p in decay["params"]) == [(4, 4), (8, 4)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(4,), (4,)]
    _loss(model, batch).backward()
    opt.step()
    # Plain lists: torch shares tensors between processes by reference, which dies with the worker.
    return {n: p.full_tensor().tolist() for n, p in model.named_parameters()}


def _loss(model: Tiny, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


def test_fsdp2_dtensor_step_matches_unsharded():
    torch.manual_seed(0)
    reference = Tiny()
    batch = torch.randint(0, 8, (6,))
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = build_optimizer(reference, Optimizer(lr=0.1, weight_decay=0.3))
    _loss(reference, batch).backward()
    opt.step()
    # Both ranks see the same batch, so FSDP's gradient average equals the single-process gradient.
    for sharded in run_distributed(_fsdp_step, 2, state, batch):
        for name, p in reference.named_parameters():
            torch.testing.assert_close(torch.tensor(sharded[name]), p.detach(), msg=name)


# --- schedule ---


def test_warmup_then_linear_decay_over_the_rest():
    # W=4, T=20, decay_ratio=-1: D=16, no stable phase.
    got = lrs(4, 20)
    expected = [1 / 5, 2 / 5, 3 / 5, 4 / 5] + [1 - (s - 4) / 16 for s in range(4, 20)]
    assert got == pytest.approx(expected)
    assert got[4] == 1.0 and got[8] == pytest.approx(0.75) and got[19] == pytest.approx(1 / 16)


def test_warmup_stable_decay_with_ratio_and_min_lr():
    # W=4, T=20, decay_ratio=0.5: D=10, stable for steps 4..9, decay from step 10 to 0.1 at step 20.
    got = lrs(4, 20, decay_ratio=0.5, min_lr_factor=0.1, steps=22)
    assert got[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert got[4:11] == pytest.approx([1.0] * 7)
    assert got[15] == pytest.approx(0.1 + 0.9 * 0.5)
    assert got[19] == pytest.approx(0.1 + 0.9 * 0.1)
    assert got[20:] == pytest.approx([0.1, 0.1])  # past the end it stays at the floor


def test_cosine_and_sqrt_shapes():
    cos = lrs(4, 20, decay_type="cosine")  # D=16
    assert cos[8] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cos[12] == pytest.approx(0.5)
    assert cos[16] == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    sqrt = lrs(4, 20, decay_type="sqrt", min_lr_factor=0.2)
    assert sqrt[8] == pytest.approx(0.2 + 0.8 * 0.5)  # progress 1/4
    assert sqrt[4] == pytest.approx(1.0)


def test_no_warmup_starts_at_peak():
    assert lrs(0, 10)[:2] == pytest.approx([1.0, 0.9])


def test_zero_decay_ratio_stays_at_peak():
    assert lrs(2, 8, decay_ratio=0.0) == pytest.approx([1 / 3, 2 / 3] + [1.0] * 6)


def test_warmup_wins_when_warmup_and_decay_exceed_the_run():
    # W=10, T=20, decay_ratio=0.8 asks for 16 decay steps; only 10 are left after warmup.
    got = lrs(10, 20, decay_ratio=0.8)
    assert got[9] == pytest.approx(10 / 11)
    assert got[10:] == pytest.approx([1 - k / 10 for k in range(10)])


def test_warmup_longer_than_the_run_is_shortened_to_the_run():
    assert lrs(10, 4) == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])


def _run(opt, sched, n: int) -> list[float]:
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def _fresh(total: int, lr: float = 1.0):
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, Optimizer(lr=lr))
    sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=3, decay_type="cosine"), total)
    return model, opt, sched


def test_state_dict_pickles_and_resumes_the_same_schedule():
    _, opt, sched = _fresh(12)
    first = _run(opt, sched, 5)
    saved = pickle.loads(pickle.dumps((opt.state_dict(), sched.state_dict())))
    rest = _run(opt, sched, 7)

    _, opt2, sched2 = _fresh(12)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert _run(opt2, sched2, 7) == pytest.approx(rest)
    assert first + rest == pytest.approx(lrs(3, 12, decay_type="cosine"))


def test_resume_with_more_steps_follows_the_new_config():
    _, opt, sched = _fresh(12)
    _run(opt, sched, 5)
    saved = pickle.loads(pickle.dumps((opt.state_dict(), sched.state_dict())))

    _, opt2, sched2 = _fresh(30, lr=123.0)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    # The shape comes from the 30-step config; the peak lr (1.0) and the step from the checkpoint.
    # The first step still runs at the lr the checkpoint stored (the 12-step schedule's step 5):
    # LambdaLR writes a new lr into the optimizer only at its next step().
    got = _run(opt2, sched2, 25)
    assert got[0] == pytest.approx(lrs(3, 12, decay_type="cosine")[5])
    assert got[1:] == pytest.approx(lrs(3, 30, decay_type="cosine")[6:])
