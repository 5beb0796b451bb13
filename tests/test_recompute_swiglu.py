"""activation_checkpoint.mode = none recomputes the SwiGLU's pointwise ops and nothing else."""

import dataclasses

import torch

from tests.test_save_attention import CountOps
from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import Transformer
from titan_cp.parallel.parallelize import apply_activation_checkpointing

ARGS = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=2)


def _step(recompute: bool):
    """Loss, gradients and matmul calls of one forward and backward, with mode none or untouched."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    if recompute:
        apply_activation_checkpointing(model, "none")
    tokens = torch.randint(ARGS.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with CountOps(torch.ops.aten.mm.default) as matmuls:
        loss = model(tokens, labels=tokens, loss_chunk_size=0)
        loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, matmuls.calls


def test_same_loss_gradients_and_matmuls_as_without_recomputation():
    ref_loss, ref_grads, ref_matmuls = _step(recompute=False)
    loss, grads, matmuls = _step(recompute=True)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    # w1's and w3's outputs are kept: backward reruns no matmul, w2's included.
    assert matmuls == ref_matmuls
