"""Build and step a tiny titan_cp Llama with the trainer's own build steps, for cp equivalence tests.

The model comes from `titan_cp.train.build_model`, `parallelize_llama` and
`titan_cp.train.materialise_and_init`, and the step is `titan_cp.train.forward_backward` (the local
loss sum divided by the valid-target count all-reduced over the world), so the tests exercise the
trainer's own code rather than a copy of it.
"""

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from titan_cp.config.schema import ActivationCheckpoint, Compile, Parallelism, Training
from titan_cp.context_parallel import AttentionContext, ContextParallel
from titan_cp.loss import IGNORE_INDEX
from titan_cp.models.llama3 import Transformer, TransformerModelArgs
from titan_cp.parallel import ParallelDims, parallelize_llama
from titan_cp.train import build_model as build_meta_model
from titan_cp.train import forward_backward as trainer_forward_backward
from titan_cp.train import materialise_and_init

SEQ_LEN = 48  # divisible by 2*cp for zigzag with cp 2 and 4, and by cp = 3 for the contiguous layout
BATCH = 2
SEED = 7
ATTENTION_SHARPNESS = 16.0  # see sharpen_attention

TINY_ARGS = TransformerModelArgs(
    dim=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=128,
    multiple_of=32,
    ffn_dim_multiplier=None,
    rope_theta=10000.0,
    rope_scaling=None,
    max_seq_len=64,
)


@dataclass(frozen=True)
class Case:
    """One configuration of a cp run: the config values the trainer would read."""

    name: str
    load_balancer: str = "zigzag"  # parallelism.context_parallel_load_balancer: zigzag | none
    sample_packing: bool = False
    loss_chunk_size: int = 20  # does not divide the local lengths, so the last chunk is short
    # Negative control: shard the positions in the other layout than the tokens. The result
    # must then differ from cp = 1, or the comparison could not notice a layout mistake.
    wrong_position_layout: bool = False
    ulysses: int = 1  # parallelism.context_parallel_ulysses_degree

    def parallelism(self, cp: int) -> Parallelism:
        return Parallelism(
            context_parallel_degree=cp,
            context_parallel_load_balancer=self.load_balancer,
            context_parallel_ulysses_degree=self.ulysses,
        )

    def training(self) -> Training:
        return Training(
            seq_len=SEQ_LEN,
            local_batch_size=BATCH,
            sample_packing=self.sample_packing,
            loss_chunk_size=self.loss_chunk_size,
        )


def plain_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, labels, positions) `[B, S]`: one window shifted on the full sequence, a few ignored targets."""
    g = torch.Generator().manual_seed(11)
    window = torch.randint(0, TINY_ARGS.vocab_size, (BATCH, SEQ_LEN + 1), generator=g)
    tokens, labels = window[:, :-1].clone(), window[:, 1:].clone()
    labels[0, [5, 23, 24, 40]] = IGNORE_INDEX  # some at shard edges, so the global count matters
    positions = torch.arange(SEQ_LEN).expand(BATCH, -1).clone()
    return tokens, labels, positions


# Per sample: (first position, length) of each run of positions. The first run of sample 1 is a
# document continued from an earlier window (it starts at position 9, not 0); the last run of
# sample 1 is padding. Boundaries 7, 20, 23, 38 and 17, 22, 31, 45 cut through the shard edges
# of cp = 2, 3 and 4 (12, 16, 24, 32, 36).
DOCUMENTS = [
    [(0, 7), (0, 13), (0, 3), (0, 15), (0, 10)],
    [(9, 17), (0, 5), (0, 9), (0, 14), (0, 3)],
]
PADDED_TAIL = [0, 3]  # tokens of padding at the end of each sample


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, labels, positions) of packed documents, laid out as `titan_cp.data.packing` does.

    Positions restart at 0 at each document start; a document's last label is -100 (it would
    predict the next document's first token), and padding has labels -100.
    """
    g = torch.Generator().manual_seed(13)
    tokens = torch.randint(0, TINY_ARGS.vocab_size, (BATCH, SEQ_LEN), generator=g)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    positions = torch.empty_like(tokens)
    for b, runs in enumerate(DOCUMENTS):
        assert sum(length for _, length in runs) == SEQ_LEN
        start = 0
        for first, length in runs:
            positions[b, start : start + length] = torch.arange(first, first + length)
            labels[b, start : start + length - 1] = tokens[b, start + 1 : start + length]
            start += length
        # A document cut by the window edge: its last token's target is in the next window.
        if b == 0:
            labels[b, SEQ_LEN - 1] = 5
    for b, pad in enumerate(PADDED_TAIL):
        labels[b, SEQ_LEN - pad :] = IGNORE_INDEX
    return tokens, labels, positions


def build_model(
    cp: ContextParallel, dims: ParallelDims, fsdp_mesh, case: Case, args: TransformerModelArgs = TINY_ARGS
) -> Transformer:
    """The model as `Trainer.__init__` builds it: meta, parallelize, materialise and initialise."""
    torch.manual_seed(SEED)
    model = build_meta_model(args, cp.attention)
    parallelize_llama(
        model,
        dims,
        fsdp_mesh,
        torch.device("cpu"),
        case.training(),
        case.parallelism(dims.cp),
        ActivationCheckpoint(),
        Compile(),
    )
    materialise_and_init(model, torch.device("cpu"))
    return model


def sharpen_attention(model: Transformer) -> None:
    """Scale wq and wk so that attention is peaked instead of nearly uniform.

    At init q·k is close to 0 for every pair, so attention averages its keys: positions sharded
    in the wrong layout changed the summed loss by only 5e-7 relative, too little for a 1e-5
    comparison to notice (with the scale: over 1e-4, which the test asserts). An elementwise scale of the local
    shards is the same on FSDP DTensors as on plain tensors.
    """
    with torch.no_grad():
        for layer in model.layers.values():
            for linear in (layer.attention.wq, layer.attention.wk):
                weight = linear.weight
                (weight.to_local() if isinstance(weight, DTensor) else weight).mul_(ATTENTION_SHARPNESS)


def full_params(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter as a full plain tensor (a collective when the model is FSDP-sharded)."""
    out = {}
    for name, param in model.named_parameters():
        value = param.detach()
        out[name] = (value.full_tensor() if isinstance(value, DTensor) else value).clone()
    return out


def full_grads(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full plain tensor (a collective under FSDP)."""
    out = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        grad = param.grad
        out[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    return out


def forward_backward(
    model: Transformer,
    case: Case,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext],
) -> float:
    """One micro-batch through the trainer's forward and backward; returns the global loss sum.

    `batch` is this rank's already-sharded (tokens, labels, positions, attention_context).
    """
    loss_sum, _ = trainer_forward_backward(model, [batch], torch.device("cpu"), case.loss_chunk_size)
    return loss_sum.item()
