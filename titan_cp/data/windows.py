"""Samples without packing: fixed-length windows cut from the concatenated token stream.

Window i covers stream tokens [i*S, i*S + S) (S = seq_len) and their labels, the next tokens
where those are targets: consecutive windows share no input token, and the last label of a
window is the first token of the next, so no target is lost at a window edge. The shift happens
here, on the full window, before any cp sharding (invariant 2 in docs/architecture.md).
"""

import torch

from titan_cp.data.cache_reader import TokenCache


class WindowSamples:
    """Random access to the windows of a token cache; the tail shorter than S + 1 is not used."""

    def __init__(self, cache: TokenCache, seq_len: int) -> None:
        self.cache = cache
        self.seq_len = seq_len
        self._positions = torch.arange(seq_len, dtype=torch.int64)

    def __len__(self) -> int:
        return max(0, (self.cache.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, positions), each [seq_len] int64."""
        span = self.cache.span(i * self.seq_len, self.seq_len)
        return torch.from_numpy(span.tokens), torch.from_numpy(span.labels), self._positions

    @property
    def padding_fraction(self) -> float:
        return 0.0
