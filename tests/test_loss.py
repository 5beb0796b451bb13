import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan_cp.loss import chunked_cross_entropy_sum

VOCAB, DIM, B, S = 50, 16, 2, 11


def _inputs():
    torch.manual_seed(0)
    output = nn.Linear(DIM, VOCAB, bias=False)
    hidden = torch.randn(B, S, DIM, requires_grad=True)
    labels = torch.randint(0, VOCAB, (B, S))
    labels[0, :3] = -100
    labels[1, 5:] = -100  # chunks of 3 tokens include some with every label ignored
    return output, hidden, labels


def _reference(output, hidden, labels):
    logits = output(hidden).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize(
    "chunk_size,compiled", [(0, False), (1, False), (3, False), (7, False), (22, False), (100, False), (0, True), (3, True)]
)
def test_matches_plain_cross_entropy_in_value_and_gradients(chunk_size, compiled):
    output, hidden, labels = _inputs()
    expected = _reference(output, hidden, labels)
    expected.backward()
    want_hidden, want_weight = hidden.grad.clone(), output.weight.grad.clone()
    hidden.grad, output.weight.grad = None, None

    got = chunked_cross_entropy_sum(hidden, output, labels, chunk_size, compiled=compiled)
    got.backward()

    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want_hidden, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(output.weight.grad, want_weight, rtol=1e-6, atol=1e-6)


def test_bf16_hidden_gives_fp32_sum():
    output, hidden, labels = _inputs()
    output = output.to(torch.bfloat16)
    got = chunked_cross_entropy_sum(hidden.detach().to(torch.bfloat16), output, labels, 4)
    assert got.dtype == torch.float32


def _largest_saved_tensor(chunk_size: int, compiled: bool = False) -> int:
    """Elements of the largest tensor autograd keeps for backward outside the checkpointed chunks."""
    output, hidden, labels = _inputs()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy_sum(hidden, output, labels, chunk_size, compiled=compiled)
    return max(sizes, default=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_loss_keeps_no_logits_for_backward(compiled):
    full_logits = B * S * VOCAB
    # Without chunking the logits are saved (this is what makes the check able to fail)...
    assert _largest_saved_tensor(0, compiled) >= full_logits
    # ...with chunking nothing vocabulary-sized survives the forward.
    assert _largest_saved_tensor(3, compiled) < 3 * VOCAB
