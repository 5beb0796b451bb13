"""activation_checkpoint.mode = full_except_attention: no-AC math, attention forward run once."""

import dataclasses
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titan_cp.context_parallel.kernels import get_kernel, local_attention
from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import Transformer
from titan_cp.parallel.parallelize import apply_activation_checkpointing

ARGS = dataclasses.replace(llama3_flavors["debugmodel"], n_layers=3)
ATTENTION_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class CountOps(TorchDispatchMode):
    """Counts calls of one op while active."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


def _loss_grads_and_attention_calls(mode: str):
    """Loss, gradients and attention-forward calls of one step of a 3-layer model in `mode`."""
    torch.manual_seed(0)
    kernel = get_kernel("sdpa_cpu")
    model = Transformer(ARGS, attention=lambda q, k, v, _context: local_attention(q, k, v, kernel))
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(ARGS.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with CountOps(ATTENTION_FORWARD) as counter:
        loss = model(tokens, labels=tokens, loss_chunk_size=32)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, counter.calls


@pytest.fixture(scope="module")
def reference():
    return _loss_grads_and_attention_calls("none")


def test_same_loss_and_gradients_as_without_checkpointing(reference):
    ref_loss, ref_grads, _ = reference
    loss, grads, _ = _loss_grads_and_attention_calls("full_except_attention")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_attention_forward_runs_once_per_layer(reference):
    """Full checkpointing repeats the attention forward in backward; this mode does not."""
    assert reference[2] == ARGS.n_layers
    assert _loss_grads_and_attention_calls("full")[2] == 2 * ARGS.n_layers
    assert _loss_grads_and_attention_calls("full_except_attention")[2] == ARGS.n_layers


def test_memory_estimate_sits_between_full_and_selective():
    from titan_cp.memory import estimate_memory

    def activations(mode):
        return estimate_memory(llama3_flavors["1B"], 131072, 1, 1, 1, mode, 2, 4096).activations

    assert activations("full") < activations("full_except_attention") < activations("selective")
