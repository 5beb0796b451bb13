"""Tokenize every document once, into one flat in-memory token array.

Each document becomes BOS + its tokens + EOS, so both the plain windows and packing see the
same token stream. The whole dataset is tokenized on each rank at start: the shipped corpus is
1 MB and `encode_batch` tokenizes it in well under a second.
"""

from dataclasses import dataclass
from itertools import chain

import torch

from titan_cp.data.tokenizer import Tokenizer

_ENCODE_CHUNK = 4096  # documents per encode_batch call: bounds the Python-list peak memory


@dataclass
class Corpus:
    """`tokens[offsets[d]:offsets[d+1]]` is document d (BOS ... EOS)."""

    tokens: torch.Tensor  # [total] int64
    offsets: torch.Tensor  # [num_documents + 1] int64, offsets[0] == 0

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def tokenize_corpus(documents: list[str], tokenizer: Tokenizer) -> Corpus:
    """Documents in order; empty ones (no tokens) are dropped."""
    pieces: list[torch.Tensor] = []
    lengths: list[int] = []
    for start in range(0, len(documents), _ENCODE_CHUNK):
        encoded = [ids for ids in tokenizer.encode_batch(documents[start : start + _ENCODE_CHUNK]) if ids]
        flat = chain.from_iterable([tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in encoded)
        pieces.append(torch.tensor(list(flat), dtype=torch.int64))
        lengths += [len(ids) + 2 for ids in encoded]
    tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=offsets[1:])
    return Corpus(tokens, offsets)
