"""MFU with packed documents counts only the attention pairs documents compute (metrics.py)."""

import torch

from titan_cp.context_parallel.document_sharding import attention_work, packed_shards
from titan_cp.context_parallel.varlen_attention import document_cu_seqlens
from titan_cp.metrics import flops_per_token, mean_causal_keys


def test_mean_causal_keys_restarts_at_documents_and_windows() -> None:
    # Window 1 opens inside a document (position 3): attention restarts at the window start.
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])
    assert mean_causal_keys(positions) == (1 + 2 + 3 + 1 + 2 + 1 + 2 + 1 + 2 + 3) / 10


def test_mean_causal_keys_equals_the_kernels_pairs() -> None:
    """The same count as the pairs the varlen attention computes (document_sharding's work)."""
    positions = torch.cat([torch.arange(n) for n in (700, 13, 1, 310)]).view(1, -1)
    shards = packed_shards(document_cu_seqlens(positions).tolist(), 1, 1024, 1, "zigzag")
    assert mean_causal_keys(positions) * 1024 == attention_work(shards)[0]


def test_packed_flops_reduce_to_the_causal_window_formula() -> None:
    args = (1000, 2, 4, 8, 64)
    window = flops_per_token(*args)
    assert window.causal == 6 * 1000 + 6 * 2 * 4 * 8 * 64
    assert flops_per_token(*args, keys_per_token=32).causal == window.causal
    packed = flops_per_token(*args, keys_per_token=5.5)
    assert packed.causal == 6 * 1000 + 12 * 2 * 4 * 8 * 5.5
    assert packed.torchtitan == window.torchtitan  # torchtitan's figure ignores documents
