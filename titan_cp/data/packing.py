"""Samples with packing: whole documents placed into seq_len windows with little padding.

The shift is per document: a document's inputs are its tokens (BOS ... EOS) and its labels are
the next tokens, so the EOS is predicted and the EOS's own label is -100. A document longer than
S = seq_len is cut into pieces of S tokens (the last one shorter); a piece's last label is the
next piece's first token, a true next token, so cutting loses no target. Each piece then starts
a new position run at 0: boundaries are carried by the positions alone (docs/architecture.md).

Pieces go into windows by best-fit decreasing over the whole dataset (longest piece first, into
the fullest window that still has room), computed once: the shipped corpus pads under 0.1%.
The rest of a window is padding: `pad_id` tokens, labels -100, and a position run of its own
starting at 0, so padding is a separate "document" that no real token attends to.
"""

import bisect

import torch

from titan_cp.data.corpus import Corpus
from titan_cp.loss import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """Assign items (each <= capacity) to bins: (bin of each item, its offset in the bin, bins).

    Deterministic: ties in length keep the input order.
    """
    bin_of = [0] * len(lengths)
    offset_of = [0] * len(lengths)
    filled: list[int] = []
    room: list[tuple[int, int]] = []  # (free space, bin), sorted, only bins with free space
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[item]
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = capacity, len(filled)
            filled.append(0)
        bin_of[item], offset_of[item] = b, filled[b]
        filled[b] += length
        if free > length:
            bisect.insort(room, (free - length, b))
    return bin_of, offset_of, len(filled)


class PackedSamples:
    """Random access to the packed windows of a corpus, built once in memory."""

    def __init__(self, corpus: Corpus, seq_len: int, pad_id: int) -> None:
        self.seq_len = seq_len
        starts, lengths = self._pieces(corpus, seq_len)
        bin_of, offset_of, num_bins = best_fit_decreasing(lengths.tolist(), seq_len)
        labels_flat = torch.roll(corpus.tokens, -1)
        labels_flat[corpus.offsets[1:] - 1] = IGNORE_INDEX  # each document's last token (EOS)

        # Scatter every piece into its window with one indexed copy instead of a Python loop.
        piece = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        within = torch.arange(len(piece)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        src = starts[piece] + within
        dst = (torch.tensor(bin_of) * seq_len + torch.tensor(offset_of))[piece] + within

        used = torch.zeros(num_bins, dtype=torch.int64).index_add_(0, torch.tensor(bin_of), lengths)
        self.tokens = torch.full((num_bins, seq_len), pad_id, dtype=torch.int64)
        self.labels = torch.full((num_bins, seq_len), IGNORE_INDEX, dtype=torch.int64)
        # Padding fills each window's tail; its positions count from 0 where the padding starts.
        self.positions = torch.arange(seq_len).expand(num_bins, -1) - used[:, None]
        self.tokens.view(-1)[dst] = corpus.tokens[src]
        self.labels.view(-1)[dst] = labels_flat[src]
        self.positions.view(-1)[dst] = within
        self.padding_fraction = 1.0 - used.sum().item() / max(1, num_bins * seq_len)

    @staticmethod
    def _pieces(corpus: Corpus, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start offset and length of every piece: documents cut into chunks of seq_len."""
        doc_len = corpus.offsets[1:] - corpus.offsets[:-1]
        count = (doc_len + seq_len - 1) // seq_len
        doc = torch.repeat_interleave(torch.arange(len(doc_len)), count)
        k = torch.arange(len(doc)) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        starts = corpus.offsets[doc] + k * seq_len
        lengths = torch.minimum(corpus.offsets[doc + 1] - starts, torch.tensor(seq_len))
        return starts, lengths

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, positions), each [seq_len] int64."""
        return self.tokens[i], self.labels[i], self.positions[i]
