"""Packing: documents recovered from positions alone, per-document shift, padding, bin packing.

The reference is built here without the packing code: every document (BOS + encode + EOS) cut
into chunks of seq_len, each chunk with the document's next tokens as labels and -100 after EOS.
"""

import bisect
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from titan_cp.config.schema import Training
from titan_cp.data import Tokenizer, build_dataloader
from titan_cp.data.cache import to_arrays, write_cache
from titan_cp.data.cache_reader import TokenCache
from titan_cp.data.documents import read_documents
from titan_cp.data.packing import PackedSamples, best_fit_decreasing, plan_packing

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets/data/tinyshakespeare.txt"
SEQ_LEN = 256
PAD = 999


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(REPO / "assets/tokenizer/tokenizer.json")


@pytest.fixture(scope="module")
def epoch(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch of the shipped corpus, packed, read through the loader."""
    cfg = Training(dataset_path=str(CORPUS), seq_len=SEQ_LEN, local_batch_size=4, sample_packing=True)
    loader = build_dataloader(cfg, tok, 0, 1, seed=0)
    per_epoch = len(loader.samples)
    batches = [next(loader) for _ in range((per_epoch + 3) // 4)]
    cat = lambda name: torch.cat([getattr(b, name) for b in batches])[:per_epoch]  # noqa: E731
    return cat("tokens"), cat("labels"), cat("positions")


def segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document in one window, from the positions alone."""
    starts = (positions == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [len(positions)]))


def reference_pieces(tok: Tokenizer) -> Counter:
    pieces: Counter = Counter()
    for text in read_documents(CORPUS):
        doc = [tok.bos_id, *tok.encode(text), tok.eos_id]
        labels = doc[1:] + [-100]
        for s in range(0, len(doc), SEQ_LEN):
            pieces[(tuple(doc[s : s + SEQ_LEN]), tuple(labels[s : s + SEQ_LEN]))] += 1
    return pieces


def test_windows_start_documents_and_positions_count_up(epoch) -> None:
    tokens, labels, positions = epoch
    assert tokens.shape[1] == SEQ_LEN
    assert (positions[:, 0] == 0).all()  # every window starts a document
    step = positions[:, 1:] - positions[:, :-1]
    assert ((step == 1) | (positions[:, 1:] == 0)).all()  # runs of 0, 1, 2, ... only


def test_shift_is_per_document_and_boundaries_are_ignored(epoch, tok: Tokenizer) -> None:
    tokens, labels, positions = epoch
    next_starts_document = positions[:, 1:] == 0
    padding = tokens == tok.pad_id  # the pad token never occurs in the text
    inside = ~next_starts_document & ~padding[:, :-1]
    # Inside a document the label is the next token; before a new document (or padding) it is -100.
    assert torch.equal(labels[:, :-1][inside], tokens[:, 1:][inside])
    assert (labels[:, :-1][next_starts_document] == -100).all()
    assert padding.any() and (labels[padding] == -100).all()
    # The EOS is a target and its own label is -100.
    eos = tokens == tok.eos_id
    assert (labels[eos] == -100).all()
    assert (labels == tok.eos_id).sum() == eos.sum()


def test_packed_content_equals_the_documents_cut_into_pieces(epoch, tok: Tokenizer) -> None:
    tokens, labels, positions = epoch
    packed: Counter = Counter()
    padding = 0
    for row in range(len(tokens)):
        for start, end in segments(positions[row]):
            t, lab = tokens[row, start:end].tolist(), labels[row, start:end].tolist()
            if end == SEQ_LEN and t[0] == tok.pad_id and set(t) == {tok.pad_id}:
                assert set(lab) == {-100}
                padding += end - start
            else:
                packed[(tuple(t), tuple(lab))] += 1
    assert packed == reference_pieces(tok)
    assert max(len(t) for t, _ in packed) == SEQ_LEN  # long speeches were cut, none is longer
    # Best-fit decreasing leaves almost nothing empty on the shipped corpus (measured 0.13%).
    assert padding / tokens.numel() < 0.005


def small_cache(tmp_path: Path, docs: list[list[int]], masks: list[list[bool]] | None = None) -> TokenCache:
    masks = masks or [[True] * len(d) for d in docs]
    write_cache(tmp_path / "cache", [to_arrays(list(zip(docs, masks)))], dict)
    return TokenCache(tmp_path / "cache")


def packed(cache: TokenCache, seq_len: int, truncation: str = "split") -> list[list[list[int]]]:
    samples = PackedSamples(cache, plan_packing(cache.offsets, seq_len, truncation), seq_len, truncation, PAD)
    return [[t.tolist() for t in samples[i]] for i in range(len(samples))]


def test_exact_layout_of_a_small_pack(tmp_path: Path) -> None:
    # Documents of 5, 3 and 10 tokens (BOS=1 ... EOS=2) into windows of 8.
    docs = [[1, 10, 11, 12, 2], [1, 20, 2], [1, 30, 31, 32, 33, 34, 35, 36, 37, 2]]
    cache = small_cache(tmp_path, docs)
    x = -100
    # Pieces 8 (first part of doc 3), 5 and 3 fill two windows; piece 2 and padding share the third.
    assert [w[0] for w in packed(cache, 8)] == [
        [1, 30, 31, 32, 33, 34, 35, 36],
        [1, 10, 11, 12, 2, 1, 20, 2],
        [37, 2, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert [w[1] for w in packed(cache, 8)] == [
        [30, 31, 32, 33, 34, 35, 36, 37],  # the cut loses no target: 36 predicts 37
        [10, 11, 12, 2, x, 20, 2, x],
        [2, x, x, x, x, x, x, x],
    ]
    assert [w[2] for w in packed(cache, 8)] == [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 0, 1, 2, 3, 4, 5],
    ]
    samples = PackedSamples(cache, plan_packing(cache.offsets, 8, "split"), 8, "split", PAD)
    assert samples.padding_fraction == pytest.approx(6 / 24)
    assert samples.plan.cut_documents == 1


def test_truncation_keeps_the_first_seq_len_tokens_and_masked_labels(tmp_path: Path) -> None:
    docs = [[1, 10, 11, 12, 2], [1, 30, 31, 32, 33, 34, 35, 36, 37, 2]]
    masks = [[False, False, True, True, True], [False, False, False, True, True, False, True, True, True, True]]
    cache = small_cache(tmp_path, docs, masks)
    x = -100
    # The long document keeps its first 8 tokens; its last label is the (cut) next token, a target.
    assert packed(cache, 8, "truncate") == [
        [[1, 30, 31, 32, 33, 34, 35, 36], [x, x, 32, 33, x, 35, 36, 37], list(range(8))],
        [[1, 10, 11, 12, 2, PAD, PAD, PAD], [x, 11, 12, 2, x, x, x, x], [0, 1, 2, 3, 4, 0, 1, 2]],
    ]


def sequential_best_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """The textbook rule, one item at a time: the reference for the vectorised packer."""
    bin_of, offset_of, filled, room = [0] * len(lengths), [0] * len(lengths), [], []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[item]
        at = bisect.bisect_left(room, (length, -1))  # the tightest fit, the older bin on ties
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


def test_vectorised_best_fit_decreasing_equals_the_sequential_rule() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        capacity = int(rng.integers(1, 50))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(0, 200)))
        bin_of, offset_of, bins = best_fit_decreasing(lengths, capacity)
        assert (bin_of.tolist(), offset_of.tolist(), bins) == sequential_best_fit_decreasing(lengths.tolist(), capacity)


def test_best_fit_decreasing_packs_tightly_and_never_overflows() -> None:
    lengths = [6, 4, 5, 5, 3, 7, 2, 8]  # 40 in all: four bins of 10 are possible
    bin_of, offset_of, bins = best_fit_decreasing(np.array(lengths), 10)
    assert bins == 4
    fill = [[0] * 10 for _ in range(bins)]
    for length, b, offset in zip(lengths, bin_of, offset_of):
        for i in range(offset, offset + length):
            fill[b][i] += 1
    assert all(cell == 1 for row in fill for cell in row)  # no overlap, no gap, no overflow
