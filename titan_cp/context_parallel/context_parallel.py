"""ContextParallel: the one object the trainer uses for cp sharding and cp attention.

It picks the algorithm once from the config, shards each batch accordingly and hands the model
an `attention(q, k, v, attention_context)` entry point:
- no packing, cp = 1: the local causal kernel;
- no packing, cp > 1: the batch ring (`ring_attention`, or ring-flash-attn with
  attn_implementation = flash_attn) in the zigzag or contiguous layout;
- packing (any cp), or ring_attn_func = varlen_llama3: document-masked varlen attention (one
  kernel call at cp = 1, all-gather K/V over the cp ranks otherwise) over the documents, which
  are found from the positions (a document starts where the position is 0); the tokens are
  sharded zigzag within each document (document_sharding.py), or contiguously with
  context_parallel_load_balancer = none and for ring-flash-attn.
The batch ring is not document-aware, so it refuses packed batches (invariant 5 in docs/architecture.md; docs/packing.md).
With parallelism.context_parallel_ulysses_degree = u > 1 the cp mesh is (cp_ring, ulysses): the
Ulysses all-to-all (ulysses.py) wraps whichever of the above runs over the cp / u ring ranks.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_cp.config.schema import Parallelism
from titan_cp.context_parallel.document_sharding import PackedShards, packed_shards
from titan_cp.context_parallel.kernels import get_kernel, local_attention, resolve_attn_implementation
from titan_cp.context_parallel.ring_attention import ring_attention
from titan_cp.context_parallel.sharding import Layout, shard, validate_seq_len
from titan_cp.context_parallel.ulysses import kv_copies, ulysses_attention, validate_ulysses
from titan_cp.context_parallel.varlen_attention import document_cu_seqlens, varlen_llama3_attention
from titan_cp.errors import UserError

Algorithm = Literal["local", "batch_ring", "varlen_llama3"]


@dataclass(frozen=True)
class AttentionContext:
    """What attention needs to know about the batch besides q/k/v; opaque to the model.

    `cu_seqlens` (int32, document starts over the flattened full `B*S` tokens, ending with
    `B*S`) and `shards` (which tokens every ring rank holds) are set when the document-masked
    attention runs, None otherwise.
    """

    layout: Layout
    cu_seqlens: torch.Tensor | None = None
    shards: PackedShards | None = None


class ContextParallel:
    """Sequence sharding and attention for one cp group (docs/architecture.md)."""

    def __init__(
        self,
        cp_mesh: DeviceMesh | None,
        parallelism: Parallelism,
        attn_implementation: str,
        sample_packing: bool,
        device: torch.device,
    ) -> None:
        self.cp = cp_mesh.size() if cp_mesh is not None else 1
        # With Ulysses the cp mesh is 2-D, (cp_ring, ulysses) (ParallelDims.build_meshes).
        with_ulysses = cp_mesh is not None and parallelism.context_parallel_ulysses_degree > 1
        ulysses_mesh = cp_mesh["ulysses"] if with_ulysses else None
        ring_mesh = cp_mesh["cp_ring"] if ulysses_mesh is not None else cp_mesh
        self.ulysses = ulysses_mesh.size() if ulysses_mesh is not None else 1
        self.ulysses_rank = ulysses_mesh.get_local_rank() if ulysses_mesh is not None else 0
        self.ulysses_group = ulysses_mesh.get_group() if ulysses_mesh is not None else None
        self.ulysses_note = ""
        self.ring = self.cp // self.ulysses
        self.ring_rank = ring_mesh.get_local_rank() if ring_mesh is not None else 0
        # The ring (or all-gather) group; None when there is no ring part.
        self.group = ring_mesh.get_group() if self.ring > 1 else None
        self.rank = self.ring_rank * self.ulysses + self.ulysses_rank
        self.sample_packing = sample_packing
        self.heads_k_stride = parallelism.heads_k_stride
        self.requested_algorithm = parallelism.ring_attn_func
        self.attn_implementation = resolve_attn_implementation(attn_implementation, device)
        self.kernel = get_kernel(self.attn_implementation)
        self.algorithm = self._pick_algorithm(parallelism.ring_attn_func)
        balanced = parallelism.context_parallel_load_balancer == "zigzag"
        # ring-flash-attn's own all-gather attention shards packed batches contiguously.
        if self.algorithm == "varlen_llama3" and self.attn_implementation == "flash_attn":
            balanced = False
        if self.ring == 1 or not balanced:
            self.layout: Layout = "contiguous"
        else:
            self.layout = "zigzag"

    def _pick_algorithm(self, ring_attn_func: str) -> Algorithm:
        if self.sample_packing or ring_attn_func == "varlen_llama3":
            # Packed documents need document masks, which only the varlen path honours; a
            # batch_ring request with packing is refused in validate().
            return "varlen_llama3"
        return "local" if self.ring == 1 else "batch_ring"

    def validate(self, seq_len: int, n_kv_heads: int, n_heads: int | None = None) -> None:
        """Raise UserError for a combination that cannot run; call once before training.

        `n_heads` (the query heads) is needed with Ulysses.
        """
        if self.ulysses > 1:
            if n_heads is None:
                raise ValueError("validate() needs n_heads when the Ulysses degree is above 1")
            self.ulysses_note = validate_ulysses(self.ulysses, n_heads, n_kv_heads)
            # The local attention sees the KV heads this rank received.
            n_kv_heads = n_kv_heads * kv_copies(self.ulysses, n_kv_heads) // self.ulysses
        if self.sample_packing and self.ring > 1 and self.requested_algorithm == "batch_ring":
            raise UserError(
                "parallelism.ring_attn_func = batch_ring cannot mask packed documents"
                " (training.sample_packing = true); use auto or varlen_llama3"
            )
        if self.heads_k_stride and n_kv_heads % self.heads_k_stride != 0:
            raise UserError(
                f"parallelism.heads_k_stride {self.heads_k_stride} must divide the model's"
                f" {n_kv_heads} KV heads" + (" per Ulysses rank" if self.ulysses > 1 else "")
            )
        if self.algorithm == "varlen_llama3":
            # Zigzag within documents cuts every document on its own: only S % cp matters.
            if seq_len % self.cp:
                raise UserError(
                    f"training.seq_len {seq_len} must be divisible by parallelism.context_parallel_degree"
                    f" {self.cp} (every rank holds seq_len / cp tokens of each sample)"
                )
        else:
            validate_seq_len(seq_len, self.cp, self.layout)

    def describe(self) -> str:
        """The attention that runs, for the startup log (after validate)."""
        packed = f", packed: {self.kernel.varlen_name}" if self.algorithm == "varlen_llama3" else ""
        inner = f"{self.algorithm} ({self.layout}, {self.attn_implementation}{packed})"
        if self.ulysses == 1:
            return inner
        across = f" over {self.ring} ring ranks" if self.ring > 1 else ""
        return f"ulysses {self.ulysses} + {inner}{across}; {self.ulysses_note}"

    def shard(
        self, tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext]:
        """This rank's part of full `[B, S]` tensors, and the context its attention needs.

        Labels are already shifted on the full sequence, so sharding loses no target.
        """
        if self.algorithm == "varlen_llama3":
            cu_seqlens = document_cu_seqlens(positions)
            shards = packed_shards(cu_seqlens.tolist(), *tokens.shape, self.ring, self.layout)
            context = AttentionContext(self.layout, cu_seqlens, shards)
        else:
            context = AttentionContext(layout=self.layout)
            if self.cp == 1:
                return tokens, labels, positions, context
        parts = (self.shard_sequence(x, context) for x in (tokens, labels, positions))
        return (*parts, context)

    def shard_sequence(self, x: torch.Tensor, context: AttentionContext | None = None) -> torch.Tensor:
        """This rank's part of a full `[B, S, ...]` tensor along dim 1, in the layout of the batch
        `context` was made for (packed batches have their own layout, `context.shards`).

        With Ulysses: the ring rank's shard in the layout, then this rank's contiguous part of it,
        so that the all-to-all puts the ring shard back together in order.
        """
        if context is not None and context.shards is not None:
            x = context.shards.shard(x, self.ring_rank)
        else:
            x = shard(x, self.ring_rank, self.ring, self.layout)
        return shard(x, self.ulysses_rank, self.ulysses, "contiguous") if self.ulysses > 1 else x

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_context: AttentionContext
    ) -> torch.Tensor:
        """Causal attention of the local queries over the whole (document of the) sequence.

        q `[B, S_local, Hq, D]`, k/v `[B, S_local, Hkv, D]` -> `[B, S_local, Hq, D]`.
        """
        if self.ulysses > 1:
            return ulysses_attention(
                q, k, v, self.ulysses_group, lambda q, k, v: self._ring_attention(q, k, v, attention_context)
            )
        return self._ring_attention(q, k, v, attention_context)

    def _ring_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_context: AttentionContext
    ) -> torch.Tensor:
        """Attention over the ring ranks (all cp ranks without Ulysses)."""
        if attention_context.shards is not None:
            return varlen_llama3_attention(
                q, k, v, attention_context.shards, self.group, self.heads_k_stride, self.kernel
            )
        if self.ring == 1:
            return local_attention(q, k, v, self.kernel, causal=True)
        if self.attn_implementation == "flash_attn":
            from titan_cp.context_parallel.ring_flash_attn_adapter import ring_flash_attention

            return ring_flash_attention(q, k, v, self.group, attention_context.layout)
        return ring_attention(q, k, v, self.group, attention_context.layout, self.kernel)
