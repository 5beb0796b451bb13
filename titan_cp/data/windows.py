"""Samples without packing: fixed-length windows cut from the concatenated token stream.

Window i is `stream[i*S : i*S + S + 1]` (S = seq_len): consecutive windows share one token, so
every stream token after the first is a target exactly once and none is lost at a window edge.
The shift happens here, on the full window, before any cp sharding (invariant 2 in docs/architecture.md).
"""

import torch

from titan_cp.data.corpus import Corpus


class WindowSamples:
    """Random access to the windows of a corpus; the tail shorter than S + 1 is not used."""

    def __init__(self, corpus: Corpus, seq_len: int) -> None:
        self.stream = corpus.tokens
        self.seq_len = seq_len
        self._positions = torch.arange(seq_len, dtype=torch.int64)

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, positions), each [seq_len] int64."""
        window = self.stream[i * self.seq_len : i * self.seq_len + self.seq_len + 1]
        return window[:-1], window[1:], self._positions

    @property
    def padding_fraction(self) -> float:
        return 0.0
