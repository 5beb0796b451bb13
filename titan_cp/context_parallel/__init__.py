"""Context parallelism: sequence sharding, LSE-returning local kernels, ring and varlen attention.

The trainer needs only `ContextParallel`; the pieces are importable for tests and tools.
"""

from titan_cp.context_parallel.context_parallel import AttentionContext, ContextParallel
from titan_cp.context_parallel.kernels import get_kernel, local_attention, resolve_attn_implementation
from titan_cp.context_parallel.ring_attention import ring_attention
from titan_cp.context_parallel.sharding import shard, unshard, validate_seq_len

__all__ = [
    "AttentionContext",
    "ContextParallel",
    "get_kernel",
    "local_attention",
    "resolve_attn_implementation",
    "ring_attention",
    "shard",
    "unshard",
    "validate_seq_len",
]
