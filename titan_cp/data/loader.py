"""The stateful data loader: which samples each data-parallel rank reads at each micro-step.

The samples (windows, or packed windows) form one list, read in a seeded random order that is
drawn anew for each epoch; the sequence of global sample indices g = 0, 1, 2, ... is therefore
fixed by the dataset, seq_len, packing and seed alone. Micro-batch n of dp rank r (of D ranks,
b = local_batch_size) holds the samples

    g = (n * D + r) * b + k,   k = 0 .. b - 1.

With A accumulation micro-steps per optimizer step (global batch G = A * D * b), step t therefore
covers exactly g in [t * G, (t + 1) * G) whatever D, A and b are: runs with dp=1 and accumulation
and runs with dp=4 and none see the same samples at every step. The loader needs no
accumulation argument for this; it only requires G to be a multiple of D * b.
"""

from dataclasses import dataclass

import torch

from titan_cp.config.schema import Training
from titan_cp.data.cache_reader import TokenCache
from titan_cp.data.corpus import open_corpus
from titan_cp.data.formats import Encoder, resolve_truncation
from titan_cp.data.packing import TRUNCATION_VERBS, PackedSamples, load_or_plan
from titan_cp.data.tokenizer import Tokenizer
from titan_cp.data.windows import WindowSamples
from titan_cp.errors import UserError


@dataclass
class Batch:
    """Full (not cp-sharded) sequences: each tensor is [local_batch_size, seq_len] int64."""

    tokens: torch.Tensor
    labels: torch.Tensor  # -100 where there is no target
    positions: torch.Tensor  # a document starts exactly where positions == 0

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, positions), the argument order of ContextParallel.shard."""
        return self.tokens, self.labels, self.positions


class DataLoader:
    """An endless iterator of micro-batches for one dp rank, resumable through its state dict."""

    def __init__(
        self,
        samples: WindowSamples | PackedSamples,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        seed: int,
        fingerprint: dict,
    ) -> None:
        self.samples = samples
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        # What the sample stream depends on; a resumed run must agree on all of it.
        self._fingerprint = {**fingerprint, "seed": seed, "samples_per_epoch": len(samples)}
        self._micro_batch = 0
        self._orders: dict[int, torch.Tensor] = {}

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> Batch:
        b = self.local_batch_size
        first = (self._micro_batch * self.dp_world_size + self.dp_rank) * b
        rows = [self.samples[self.sample_index(g)] for g in range(first, first + b)]
        self._micro_batch += 1
        return Batch(*(torch.stack(column) for column in zip(*rows)))

    def sample_index(self, g: int) -> int:
        """The sample read at global position g: a seeded permutation per epoch."""
        epoch, i = divmod(g, len(self.samples))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            # Keep only the neighbouring epoch: a micro-batch spans at most two.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = torch.randperm(len(self.samples), generator=generator)
        return int(self._orders[epoch][i])

    def state_dict(self) -> dict:
        """The global position (same on every rank), so a resume may even change dp."""
        consumed = self._micro_batch * self.dp_world_size * self.local_batch_size
        return {"samples_consumed": consumed, **self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._fingerprint.items():
            if state.get(key) != value:
                raise UserError(
                    f"checkpoint: data loader state was saved with {key}={state.get(key)!r}, this run has"
                    f" {value!r}; resume with the same dataset, training.seq_len, training.sample_packing"
                    " and debug.seed"
                )
        consumed, per_micro_batch = state["samples_consumed"], self.dp_world_size * self.local_batch_size
        if consumed % per_micro_batch:
            raise UserError(
                f"checkpoint: data loader stopped after {consumed} samples, not a multiple of"
                f" dp x training.local_batch_size = {per_micro_batch}"
            )
        self._micro_batch = consumed // per_micro_batch

    def summary(self) -> str:
        """One line for the start of a run: the cache used, the samples, padding and cut documents."""
        cache, samples = self.samples.cache, self.samples
        line = (
            f"data: {cache.num_documents} documents, {cache.num_tokens} tokens ({cache.num_targets} targets)"
            f" from the token cache {cache.folder}; {len(samples)} samples of {samples.seq_len} tokens per"
            f" epoch, packing {isinstance(samples, PackedSamples)} (padding {100 * samples.padding_fraction:.2f}%)"
        )
        if isinstance(samples, PackedSamples) and samples.plan.cut_documents:
            line += (
                f"; {samples.plan.cut_documents} documents longer than {samples.seq_len} tokens were"
                f" {TRUNCATION_VERBS[samples.truncation]}"
                f" (training.truncation = {samples.truncation})"
            )
        return line


def build_dataloader(
    training: Training, tokenizer: Tokenizer, dp_rank: int, dp_world_size: int, seed: int
) -> DataLoader:
    """The loader of dp rank `dp_rank`; all ranks of one cp group pass the same dp_rank.

    Micro-batch n of this rank holds global samples (n * dp_world_size + dp_rank) * b + k for
    k < b = training.local_batch_size, so each optimizer step reads the same global_batch_size
    samples for any split into dp ranks and accumulation steps (module docstring); the trainer has
    checked that training.global_batch_size is a multiple of local_batch_size x dp. Raises
    UserError for a bad dataset path, file or size.
    """
    b, seq_len = training.local_batch_size, training.seq_len
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world_size})")
    samples = build_samples(training.dataset_path, "training.dataset_path", training, tokenizer)
    fingerprint = {
        "dataset": samples.cache.digest,
        "seq_len": seq_len,
        "sample_packing": training.sample_packing,
    }
    return DataLoader(samples, b, dp_rank, dp_world_size, seed, fingerprint)


def truncation_of(training: Training, cache: TokenCache) -> str:
    """training.truncation, with `auto` resolved for the format the cache was built with."""
    return resolve_truncation(training.truncation, cache.meta["format"])


def build_samples(dataset_path: str, key: str, training: Training, tokenizer: Tokenizer) -> WindowSamples | PackedSamples:
    """The samples of a dataset (`key` names its config key in errors): the token cache is opened,
    or built by local rank 0 of each node while the others wait, with its packing plan."""
    seq_len = training.seq_len

    def add_plan(cache: TokenCache) -> None:
        load_or_plan(cache, seq_len, truncation_of(training, cache))

    encoder = Encoder(tokenizer, training.dataset_format, training.train_on_inputs)
    cache = open_corpus(
        dataset_path, training.dataset_cache_dir, encoder, key, then=add_plan if training.sample_packing else None
    )
    if cache.num_tokens < seq_len + 1:
        raise UserError(
            f"{key}: {dataset_path} has {cache.num_tokens} tokens (BOS/EOS included), fewer than"
            f" training.seq_len + 1 = {seq_len + 1} needed for one sample"
        )
    if not training.sample_packing:
        return WindowSamples(cache, seq_len)
    truncation = truncation_of(training, cache)
    return PackedSamples(cache, load_or_plan(cache, seq_len, truncation), seq_len, truncation, tokenizer.pad_id)
