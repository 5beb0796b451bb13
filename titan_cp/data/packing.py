"""Samples with packing: whole documents placed into seq_len windows with little padding.

A document longer than S = seq_len is cut into pieces of S tokens (truncation "split", the last
piece shorter), keeps only its first S tokens ("truncate") or is left out ("drop"). Labels come from the full document
(docs/data.md): a piece's last label is the document's next token when that token is a target,
so cutting loses no target.
Each piece starts a new position run at 0: boundaries are carried by the positions alone.

Pieces go into windows by best-fit decreasing over the whole dataset (longest piece first, into
the fullest window that still has room). The plan (which pieces, in which window, in which
order) is computed once, vectorised, and stored with the token cache; a sample is assembled
from the cache only when it is read. The rest of a window is padding: `pad_id` tokens, labels
-100, and a position run of its own starting at 0, so padding is a separate "document" that no
real token attends to.
"""

import uuid
from dataclasses import dataclass

import numpy as np
import torch

from titan_cp.data.cache_reader import TokenCache
from titan_cp.loss import IGNORE_INDEX

# What happens to a document longer than seq_len, by training.truncation (resolved).
TRUNCATION_VERBS = {"split": "split into pieces", "truncate": "truncated", "drop": "dropped"}


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign items (each 1..capacity long) to bins: (bin of each item, its offset in the bin, bins).

    Exactly the sequential rule "longest item first (ties in input order), into the bin with the
    least room that still fits it (ties: the older bin), else a new bin", computed one distinct
    length at a time: items of equal length L fill the candidate bins in order of room, each bin
    taking room // L of them before the next (after one item its room shrinks, so it stays the
    tightest fit), and then new bins of capacity // L. The work is O(distinct lengths x bins),
    at most about the number of tokens, in numpy.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    bin_of = np.empty(n, dtype=np.int64)
    offset_of = np.empty(n, dtype=np.int64)
    filled = np.zeros(max(16, n // 4), dtype=np.int64)
    num_bins = 0
    order = np.argsort(-lengths, kind="stable")
    group_starts = np.flatnonzero(np.diff(lengths[order])) + 1
    for items in np.split(order, group_starts):
        if not len(items):
            continue
        length, count = int(lengths[items[0]]), len(items)
        room = capacity - filled[:num_bins]
        candidates = np.flatnonzero(room >= length)
        candidates = candidates[np.argsort(room[candidates], kind="stable")]
        fits = room[candidates] // length
        taken = np.cumsum(fits)
        if len(taken) and taken[-1] >= count:
            last = int(np.searchsorted(taken, count))
            bins, per_bin = candidates[: last + 1], fits[: last + 1].copy()
            per_bin[-1] -= taken[last] - count
        else:
            rest = count - (int(taken[-1]) if len(taken) else 0)
            per_new = capacity // length
            new = -(-rest // per_new)
            if num_bins + new > len(filled):
                filled = np.concatenate([filled, np.zeros(max(len(filled), new), dtype=np.int64)])
            new_counts = np.full(new, per_new, dtype=np.int64)
            new_counts[-1] = rest - per_new * (new - 1)
            bins = np.concatenate([candidates, np.arange(num_bins, num_bins + new)])
            per_bin = np.concatenate([fits, new_counts])
            num_bins += new
        item_bin = np.repeat(bins, per_bin)
        within = np.arange(count) - np.repeat(np.cumsum(per_bin) - per_bin, per_bin)
        bin_of[items] = item_bin
        offset_of[items] = filled[item_bin] + within * length
        filled[bins] += per_bin * length
    return bin_of, offset_of, num_bins


@dataclass
class PackPlan:
    """Window w holds pieces bin_start[w] .. bin_start[w + 1] - 1, in that order from position 0."""

    piece_start: np.ndarray  # int64 [pieces]: flat token index in the cache
    piece_length: np.ndarray  # int64 [pieces]
    bin_start: np.ndarray  # int64 [windows + 1]
    cut_documents: int  # documents longer than seq_len (split or truncated)

    @property
    def num_windows(self) -> int:
        return len(self.bin_start) - 1


def plan_packing(offsets: np.ndarray, seq_len: int, truncation: str) -> PackPlan:
    """Cut documents into pieces of at most seq_len and pack them by best-fit decreasing."""
    offsets = np.asarray(offsets, dtype=np.int64)
    doc_len = np.diff(offsets)
    if truncation == "split":
        count = -(-doc_len // seq_len)
    elif truncation == "truncate":
        count = np.ones_like(doc_len)
    else:
        count = (doc_len <= seq_len).astype(np.int64)
    doc = np.repeat(np.arange(len(doc_len)), count)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)
    starts = offsets[doc] + k * seq_len
    lengths = np.minimum(offsets[doc + 1] - starts, seq_len)
    bin_of, offset_of, num_bins = best_fit_decreasing(lengths, seq_len)
    order = np.lexsort((offset_of, bin_of))
    bin_start = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=num_bins), out=bin_start[1:])
    return PackPlan(starts[order], lengths[order], bin_start, int((doc_len > seq_len).sum()))


def load_or_plan(cache: TokenCache, seq_len: int, truncation: str) -> PackPlan:
    """The plan stored with the cache, computed and stored first if it is not there yet."""
    path = cache.folder / "plans" / f"pack-{seq_len}-{truncation}.npz"
    if not path.is_file():
        plan = plan_packing(cache.offsets, seq_len, truncation)
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")  # nodes may share the folder
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in vars(plan).items()})
        tmp.replace(path)  # atomic: readers see the whole plan or none
        return plan
    with np.load(path) as stored:
        return PackPlan(
            stored["piece_start"], stored["piece_length"], stored["bin_start"], int(stored["cut_documents"])
        )


class PackedSamples:
    """Random access to the packed windows of a token cache, assembled when read."""

    def __init__(self, cache: TokenCache, plan: PackPlan, seq_len: int, truncation: str, pad_id: int) -> None:
        self.cache = cache
        self.plan = plan
        self.truncation = truncation
        self.seq_len = seq_len
        self.pad_id = pad_id
        used = int(plan.piece_length.sum())
        self.padding_fraction = 1.0 - used / max(1, plan.num_windows * seq_len)

    def __len__(self) -> int:
        return self.plan.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, positions), each [seq_len] int64."""
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.empty(self.seq_len, dtype=np.int64)
        at = 0
        first, last = self.plan.bin_start[i], self.plan.bin_start[i + 1]
        for start, length in zip(self.plan.piece_start[first:last].tolist(), self.plan.piece_length[first:last].tolist()):
            span = self.cache.span(start, length)
            tokens[at : at + length] = span.tokens
            labels[at : at + length] = span.labels
            positions[at : at + length] = np.arange(length)
            at += length
        positions[at:] = np.arange(self.seq_len - at)  # padding: a position run of its own
        return torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(positions)
