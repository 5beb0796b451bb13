"""The validation loss: the mean loss over every target token of the validation set.

It is a global token mean like the training loss: each rank sums the losses of its own tokens
(its dp share of the samples, its cp shard of each), and one all-reduce of (loss sum, target
count) over all ranks gives sum / count. Every target is counted exactly once for any dp x cp
layout, so the figure does not depend on the layout (tests/test_validation.py).

The samples are read in order, without shuffling. A validation step reads
training.global_batch_size samples spread over the dp ranks exactly as a training step does
(docs/data.md), so `validation.steps` covers the same samples for every layout; with -1 the
steps cover the whole set once. Slots past the end of the set get an empty sample (padding with
no targets), so every rank runs the same number of forward passes and the collectives inside
FSDP and context parallelism stay matched.
"""

import torch
import torch.distributed as dist

from titan_cp.config.schema import Training, Validation
from titan_cp.context_parallel import ContextParallel
from titan_cp.loss import IGNORE_INDEX
from titan_cp.data.loader import build_samples
from titan_cp.data.tokenizer import Tokenizer
from titan_cp.errors import UserError


class Validator:
    """Built on every rank (the token cache may be built on the way); `run` on every rank too."""

    def __init__(
        self,
        validation: Validation,
        training: Training,
        tokenizer: Tokenizer,
        dp_rank: int,
        dp_world_size: int,
        cp: ContextParallel,
        device: torch.device,
    ) -> None:
        if not validation.dataset_path:
            raise UserError("validation.dataset_path: empty; validation.enable = true needs a dataset to validate on")
        if validation.freq < 1:
            raise UserError(f"validation.freq: {validation.freq} must be at least 1 (steps between validation runs)")
        if validation.steps == 0 or validation.steps < -1:
            raise UserError(f"validation.steps: {validation.steps} must be -1 (the whole set) or at least 1")
        self.freq = validation.freq
        self.cp = cp
        self.device = device
        self.loss_chunk_size = training.loss_chunk_size
        self.local_batch_size = training.local_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.samples = build_samples(validation.dataset_path, "validation.dataset_path", training, tokenizer)
        per_micro_batch = self.local_batch_size * dp_world_size
        per_step = training.global_batch_size if training.global_batch_size != -1 else per_micro_batch
        whole_set = -(-len(self.samples) // per_step)
        steps = whole_set if validation.steps == -1 else min(validation.steps, whole_set)
        self.num_samples = min(len(self.samples), steps * per_step)
        self.micro_batches = steps * per_step // per_micro_batch
        seq_len = training.seq_len
        self._empty = (
            torch.full((seq_len,), tokenizer.pad_id, dtype=torch.int64),
            torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64),
            torch.arange(seq_len, dtype=torch.int64),
        )

    def should_run(self, step: int) -> bool:
        return step % self.freq == 0

    def _micro_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.local_batch_size
        first = (n * self.dp_world_size + self.dp_rank) * b
        rows = [self.samples[g] if g < self.num_samples else self._empty for g in range(first, first + b)]
        return tuple(torch.stack(column) for column in zip(*rows))

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> tuple[float, int]:
        """(mean loss over the validation targets, their number); the model keeps its mode."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, target count
        for n in range(self.micro_batches):
            tokens, labels, positions, context = self.cp.shard(*self._micro_batch(n))
            totals[1] += int((labels != IGNORE_INDEX).sum())
            tokens, labels, positions = (t.to(self.device, non_blocking=True) for t in (tokens, labels, positions))
            totals[0] += model(tokens, positions, context, labels=labels, loss_chunk_size=self.loss_chunk_size).double()
        if dist.is_initialized():
            dist.all_reduce(totals)
        model.train(was_training)
        return (totals[0] / totals[1]).item(), int(totals[1].item())
