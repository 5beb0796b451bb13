"""Which tokens of a packed batch each cp rank holds: contiguous, or zigzag within every document.

Under a causal mask a query at document offset t attends to t + 1 keys, so the attention work of
a shard is the sum of (t + 1) over its tokens. Contiguous shards (rank r holds `[r·L, (r+1)·L)`
of every sample) give the rank holding the end of a long document the most: one 128K document
at cp = 8 gives the last rank 15x the first rank's work. The zigzag layout applies the head-tail
idea to each document on its own: a document is cut into 2·cp chunks and rank r holds chunks r
and 2·cp−1−r. For a document of length 2·cp·c the two chunks of every rank cover
`c·(r·c) + c·(c+1)/2 + c·((2cp−1−r)·c) + c·(c+1)/2 = 2cp·c² + c` pairs: the same for all ranks.

Documents rarely divide by 2·cp, and every rank must hold exactly L = S/cp tokens of every
sample (the model runs on `[B, L]` shards). So each document's chunks get `n // 2cp` tokens,
and its `n % 2cp` remaining tokens go one at a time to the rank with the fewest tokens so far in
the sample (ties: the least work), into its tail chunk when the rank is below the mean work and
its head chunk otherwise, at most one per chunk. Picking the rank with the fewest tokens keeps the
token counts within one of each other after every document, so they end equal (S % cp == 0).
tests/test_cp_sharding.py measures the resulting work imbalance on the shipped corpus and on
synthetic mixes.

A rank's local order is sample-major, then document order, head chunk before tail chunk; each
contiguous piece of a document in that order is a *run* `(sample, document start, start, end)`
(positions within the sample). Tokens, labels and positions are all gathered with the same
index, so positions travel with their tokens and labels stay the ones shifted on the full
sequence.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PackedLayout = Literal["zigzag", "contiguous"]
Run = tuple[int, int, int, int]  # (sample, document start, start, end), positions within the sample


@dataclass(frozen=True, eq=False)
class PackedShards:
    """Every rank's tokens of one packed batch (made once per batch; compared by identity).

    `token_index[r]` `[B, L]` holds the in-sample positions of rank r's tokens in its local
    order; `runs[r]` describes the same tokens run by run.
    """

    layout: PackedLayout
    batch: int
    seq_len: int
    cp: int
    token_index: Tensor
    runs: tuple[tuple[Run, ...], ...]

    def shard(self, x: Tensor, rank: int) -> Tensor:
        """Rank `rank`'s part `[B, L, ...]` of a full `[B, S, ...]` tensor."""
        return x.gather(1, self._index(rank, x))

    def unshard(self, parts: list[Tensor]) -> Tensor:
        """The full tensor from every rank's part (`parts[r]` from rank r), inverse of `shard`."""
        full = parts[0].new_empty((self.batch, self.seq_len) + tuple(parts[0].shape[2:]))
        for rank, part in enumerate(parts):
            full.scatter_(1, self._index(rank, part), part)
        return full

    def _index(self, rank: int, like: Tensor) -> Tensor:
        index = self.token_index[rank].to(like.device)
        trailing = tuple(like.shape[2:])
        return index.view(index.shape + (1,) * len(trailing)).expand(index.shape + trailing)


def sample_documents(bounds: list[int], batch: int, seq_len: int) -> list[list[tuple[int, int]]]:
    """Per sample, its documents as (start, end) within the sample, from flattened cu_seqlens."""
    docs = []
    for b in range(batch):
        starts = sorted({0} | {c - b * seq_len for c in bounds if b * seq_len < c < (b + 1) * seq_len})
        docs.append(list(zip(starts, starts[1:] + [seq_len])))
    return docs


def packed_shards(bounds: list[int], batch: int, seq_len: int, cp: int, layout: PackedLayout) -> PackedShards:
    """Assign the tokens of a packed `[B, S]` batch (document boundaries `bounds`, the flattened
    cu_seqlens as ints) to `cp` ranks in `layout`."""
    if seq_len % cp:
        raise ValueError(f"sequence length {seq_len} is not divisible by cp = {cp}")
    if cp == 1:
        layout = "contiguous"  # one rank holds every document whole
    per_rank: list[list[Run]] = [[] for _ in range(cp)]
    for b, docs in enumerate(sample_documents(bounds, batch, seq_len)):
        assign = _zigzag_runs if layout == "zigzag" else _contiguous_runs
        for rank, runs in enumerate(assign(docs, seq_len, cp)):
            per_rank[rank] += [(b, s, a, e) for s, a, e in runs]
    shard_len = seq_len // cp
    token_index = torch.empty(cp, batch, shard_len, dtype=torch.int64)
    for rank, runs in enumerate(per_rank):
        for b in range(batch):
            pieces = [torch.arange(a, e) for sample, _, a, e in runs if sample == b]
            row = torch.cat(pieces)
            if row.numel() != shard_len:
                raise AssertionError(f"rank {rank} got {row.numel()} tokens of sample {b}, not {shard_len}")
            token_index[rank, b] = row
    return PackedShards(layout, batch, seq_len, cp, token_index, tuple(tuple(r) for r in per_rank))


def _contiguous_runs(docs: list[tuple[int, int]], seq_len: int, cp: int) -> list[list[tuple[int, int, int]]]:
    shard_len = seq_len // cp
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(cp)]
    for rank in range(cp):
        lo, hi = rank * shard_len, (rank + 1) * shard_len
        runs[rank] = [(s, max(s, lo), min(e, hi)) for s, e in docs if s < hi and e > lo]
    return runs


def _zigzag_runs(docs: list[tuple[int, int]], seq_len: int, cp: int) -> list[list[tuple[int, int, int]]]:
    chunks = 2 * cp
    tokens = [0] * cp
    work = [0] * cp
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(cp)]
    for s, e in docs:
        n = e - s
        sizes = [n // chunks] * chunks
        free_chunks = [[r, chunks - 1 - r] for r in range(cp)]  # each chunk takes one extra at most
        for _ in range(n % chunks):
            rank = min((r for r in range(cp) if free_chunks[r]), key=lambda r: (tokens[r], work[r]))
            # A token added to the tail chunk costs more work than one added to the head chunk.
            tail_first = work[rank] * cp < sum(work)
            sizes[free_chunks[rank].pop(-1 if tail_first else 0)] += 1
            tokens[rank] += 1
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        for rank in range(cp):
            for chunk in (rank, chunks - 1 - rank):
                a, z = offsets[chunk], offsets[chunk + 1]
                if z > a:
                    runs[rank].append((s, s + a, s + z))
                    work[rank] += _pairs(a, z)
            tokens[rank] += 2 * (n // chunks)
    return runs


def _pairs(a: int, z: int) -> int:
    """Causal query-key pairs of the queries at document offsets [a, z): sum of (t + 1)."""
    return (z * (z + 1) - a * (a + 1)) // 2


def attention_work(shards: PackedShards) -> list[int]:
    """Causal query-key pairs each rank computes: its runs' queries times the keys they see."""
    return [sum(_pairs(a - s, e - s) for _, s, a, e in runs) for runs in shards.runs]


def work_imbalance(work: list[int]) -> float:
    """max / min - 1 of the per-rank work (0 = perfectly balanced)."""
    return max(work) / max(min(work), 1) - 1
