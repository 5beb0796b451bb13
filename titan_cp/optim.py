"""AdamW with decay on matrices only, and the warmup-stable-decay learning-rate schedule."""

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from titan_cp.config.schema import LRScheduler, Optimizer


def build_optimizer(model: nn.Module, optimizer_cfg: Optimizer) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters.

    Weight decay applies to every parameter with two or more dimensions (linear weights and the
    embedding) and not to 1-D ones (RMSNorm scales, biases): shrinking a norm scale towards zero
    only fights the normalisation. `ndim` is the global shape's, so FSDP2's DTensor shards land in
    the same group as the full tensors would. On CUDA the fused kernel (one launch for all
    parameters, DTensor included) is used; elsewhere torch picks its default implementation.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optimizer_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=optimizer_cfg.lr,
        betas=(optimizer_cfg.beta1, optimizer_cfg.beta2),
        eps=optimizer_cfg.eps,
        fused=True if on_cuda else None,
    )


class WarmupStableDecay:
    """The learning-rate factor for 0-based step `s`: linear warmup, a flat phase, then a decay.

    - warmup, `s < W`: `(s + 1) / (W + 1)`, so the first step runs at lr/(W+1) and step W at lr;
    - stable, `W <= s < W + S`: 1;
    - decay, `s >= W + S`: `p = (s - W - S) / D` clamped to [0, 1], shaped by `decay_type` from 1
      down to `min_lr_factor`. The decay starts at the peak and reaches `min_lr_factor` at step
      T = W + S + D, just after the last training step, so no step runs at zero lr.
    """

    # The shape lives in slots, leaving `__dict__` empty: LambdaLR.state_dict saves a callable's
    # `__dict__` and load_state_dict writes it back, which would let a checkpoint replace the
    # schedule of the current config (say, a run resumed with more steps). Only the step count
    # (LambdaLR.last_epoch) should travel in the checkpoint.
    __slots__ = ("warmup_steps", "stable_steps", "decay_steps", "decay_type", "min_lr_factor", "__dict__")

    def __init__(self, lr_cfg: LRScheduler, total_steps: int) -> None:
        self.warmup_steps = min(lr_cfg.warmup_steps, total_steps)
        after_warmup = total_steps - self.warmup_steps
        if lr_cfg.decay_ratio == -1:
            self.decay_steps = after_warmup
        else:
            # Warmup wins when warmup and decay together exceed the run.
            self.decay_steps = min(round(lr_cfg.decay_ratio * total_steps), after_warmup)
        self.stable_steps = after_warmup - self.decay_steps
        self.decay_type = lr_cfg.decay_type
        self.min_lr_factor = lr_cfg.min_lr_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_start = self.warmup_steps + self.stable_steps
        if step < decay_start or self.decay_steps == 0:
            return 1.0
        progress = min((step - decay_start) / self.decay_steps, 1.0)
        if self.decay_type == "linear":
            shape = 1.0 - progress
        elif self.decay_type == "sqrt":
            shape = 1.0 - math.sqrt(progress)
        else:  # cosine
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_cfg: LRScheduler, total_steps: int) -> LambdaLR:
    """A LambdaLR following `WarmupStableDecay`; call `step()` once after each optimizer step.

    Its state_dict holds only the step count and base learning rates, so on resume the schedule's
    shape comes from the current config and the position in it from the checkpoint. A warmup
    longer than the run is shortened to the run.
    """
    return LambdaLR(optimizer, WarmupStableDecay(lr_cfg, total_steps))
