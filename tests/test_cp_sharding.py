"""Sequence sharding layouts, their round trips, the causal-work balance of packed shards, and
ContextParallel's choices and refusals."""

import random

import pytest
import torch

from titan_cp.config.schema import Parallelism, Training
from titan_cp.context_parallel import ContextParallel, shard, unshard, validate_seq_len
from titan_cp.context_parallel.document_sharding import attention_work, packed_shards, work_imbalance
from titan_cp.context_parallel.varlen_attention import document_cu_seqlens
from titan_cp.data import Tokenizer, build_dataloader
from titan_cp.errors import UserError


class _StubCpMesh:
    """Stands in for a 1-D cp DeviceMesh where no process group is needed (validation only)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank

    def get_group(self):
        return None


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_rank_holds_chunk_r_and_its_mirror(cp):
    seq = torch.arange(2 * cp * 3).view(1, -1)  # chunks of 3 tokens
    for rank in range(cp):
        mirror = 2 * cp - 1 - rank
        expected = list(range(3 * rank, 3 * rank + 3)) + list(range(3 * mirror, 3 * mirror + 3))
        assert shard(seq, rank, cp, "zigzag").flatten().tolist() == expected


def test_contiguous_rank_holds_its_slice():
    seq = torch.arange(12).view(1, 12)
    assert [shard(seq, r, 3, "contiguous").flatten().tolist() for r in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_unshard_round_trip(layout, cp):
    x = torch.randn(2, 32, 3, 5)
    shards = [shard(x, r, cp, layout) for r in range(cp)]
    assert all(s.shape == (2, 32 // cp, 3, 5) and s.is_contiguous() for s in shards)
    assert torch.equal(unshard(shards, layout), x)
    # Every token lands on exactly one rank.
    ids = torch.arange(32).expand(2, 32)
    assert sorted(torch.cat([shard(ids, r, cp, layout)[0] for r in range(cp)]).tolist()) == list(range(32))


def test_shard_rejects_indivisible_tensors():
    with pytest.raises(ValueError, match="divisible by 4"):
        shard(torch.zeros(1, 6), 0, 2, "zigzag")


def test_validate_seq_len_messages():
    with pytest.raises(UserError) as info:
        validate_seq_len(1020, 4, "zigzag")
    assert str(info.value) == (
        "training.seq_len 1020 must be divisible by 2*cp = 8 for"
        " parallelism.context_parallel_load_balancer = zigzag"
    )
    with pytest.raises(UserError, match="training.seq_len 10 must be divisible by cp = 4"):
        validate_seq_len(10, 4, "contiguous")
    validate_seq_len(1024, 4, "zigzag")
    validate_seq_len(12, 4, "contiguous")


def _cp(cp: int, packing: bool = False, **parallelism) -> ContextParallel:
    mesh = _StubCpMesh(cp) if cp > 1 else None
    return ContextParallel(mesh, Parallelism(**parallelism), "auto", packing, torch.device("cpu"))


def test_algorithm_and_layout_choices():
    assert (_cp(1).algorithm, _cp(1).layout) == ("local", "contiguous")
    assert (_cp(2).algorithm, _cp(2).layout) == ("batch_ring", "zigzag")
    none = _cp(2, context_parallel_load_balancer="none")
    assert (none.algorithm, none.layout) == ("batch_ring", "contiguous")
    assert (_cp(2, True).algorithm, _cp(2, True).layout) == ("varlen_llama3", "zigzag")
    packed_none = _cp(2, True, context_parallel_load_balancer="none")
    assert (packed_none.algorithm, packed_none.layout) == ("varlen_llama3", "contiguous")
    assert _cp(1, True).algorithm == "varlen_llama3"  # documents are masked at cp=1 too
    assert _cp(2, ring_attn_func="varlen_llama3").algorithm == "varlen_llama3"


def test_validate_refuses_batch_ring_with_packing():
    with pytest.raises(UserError, match="batch_ring cannot mask packed documents") as info:
        _cp(2, True, ring_attn_func="batch_ring").validate(64, 8)
    assert "\n" not in str(info.value)


def test_validate_heads_k_stride_must_divide_kv_heads():
    with pytest.raises(UserError, match="parallelism.heads_k_stride 3 must divide the model's 8 KV heads"):
        _cp(2, True, heads_k_stride=3).validate(64, 8)
    _cp(2, True, heads_k_stride=4).validate(64, 8)


def test_validate_seq_len_follows_the_layout():
    with pytest.raises(UserError, match="2\\*cp = 8"):
        _cp(4).validate(36, 8)
    _cp(4, context_parallel_load_balancer="none").validate(36, 8)
    _cp(4).validate(64, 8)
    # Packed zigzag cuts each document on its own: only seq_len % cp matters.
    _cp(4, True).validate(36, 8)
    with pytest.raises(UserError, match="training.seq_len 34 must be divisible by parallelism.context_parallel_degree 4"):
        _cp(4, True).validate(34, 8)


# --- packed documents: which tokens each rank holds, and how much causal work that is -----------

CP_DEGREES = (2, 4, 8)
MAX_IMBALANCE = 0.05  # the slowest rank's causal work at most 5% above the lightest's


def _boundaries(doc_lengths: list[int]) -> list[int]:
    bounds = [0]
    for n in doc_lengths:
        bounds.append(bounds[-1] + n)
    return bounds


def _shipped_corpus_windows(count: int = 6, seq_len: int = 8192) -> list[list[int]]:
    """Document boundaries of the first packed windows of the shipped corpus, as the loader packs them."""
    training = Training(seq_len=seq_len, sample_packing=True, local_batch_size=1)
    samples = build_dataloader(training, Tokenizer("assets/tokenizer/tokenizer.json"), 0, 1, seed=0).samples
    return [document_cu_seqlens(samples[i][2].view(1, -1)).tolist() for i in range(count)]


def _long_document_mix(seq_len: int, seed: int) -> list[int]:
    """One document of half the window, then documents of 256 to 16K tokens filling the rest."""
    rng = random.Random(seed)
    lengths = [seq_len // 2]
    while sum(lengths) < seq_len:
        lengths.append(min(rng.randint(256, 16384), seq_len - sum(lengths)))
    rng.shuffle(lengths)
    return lengths


MIXES = {
    "shipped corpus, 8K windows": lambda: [(w, 8192) for w in _shipped_corpus_windows()],
    "uniform 8K documents, 128K window": lambda: [(_boundaries([8192] * 16), 131072)],
    "one 128K document": lambda: [(_boundaries([131072]), 131072)],
    "long-document mix, 128K windows": lambda: [(_boundaries(_long_document_mix(131072, seed)), 131072) for seed in range(3)],
}


@pytest.fixture(scope="module")
def imbalances() -> dict[tuple[str, str, int], float]:
    """Worst per-window work imbalance for every mix, layout and cp degree (printed with -s)."""
    table = {}
    for name, windows in MIXES.items():
        for bounds, seq_len in windows():
            for cp in CP_DEGREES:
                for layout in ("zigzag", "contiguous"):
                    work = attention_work(packed_shards(bounds, 1, seq_len, cp, layout))
                    key = (name, layout, cp)
                    table[key] = max(table.get(key, 0.0), work_imbalance(work))
    for (name, layout, cp), value in table.items():
        print(f"work imbalance (max/min - 1): {name}, {layout}, cp={cp}: {value:.4f}")
    return table


@pytest.mark.parametrize("cp", CP_DEGREES)
@pytest.mark.parametrize("mix", list(MIXES))
def test_packed_zigzag_balances_causal_work(imbalances, mix: str, cp: int) -> None:
    assert imbalances[mix, "zigzag", cp] <= MAX_IMBALANCE


def test_contiguous_packed_shards_are_unbalanced(imbalances) -> None:
    """The measure can fail: contiguous shards of long documents load the last rank most."""
    assert imbalances["one 128K document", "contiguous", 8] > 10
    assert imbalances["long-document mix, 128K windows", "contiguous", 4] > 0.5


def test_attention_work_counts_causal_pairs() -> None:
    shards = packed_shards(_boundaries([6, 4]), 1, 10, 1, "zigzag")
    assert attention_work(shards) == [6 * 7 // 2 + 4 * 5 // 2]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_packed_shards_cover_every_token_once_and_round_trip(layout: str) -> None:
    doc_lengths = ([7, 23, 5, 19, 18], [40, 1, 2, 29])
    positions = torch.stack([torch.cat([torch.arange(n) for n in sample]) for sample in doc_lengths])
    cp = 4
    shards = packed_shards(document_cu_seqlens(positions).tolist(), 2, 72, cp, layout)
    values = torch.randn(2, 72, 3)
    parts = [shards.shard(values, r) for r in range(cp)]
    assert all(p.shape == (2, 18, 3) for p in parts)
    assert torch.equal(shards.unshard(parts), values)
    # Positions travel with their tokens: each rank's positions are those of the tokens it holds.
    for r in range(cp):
        assert torch.equal(shards.shard(positions, r), positions.gather(1, shards.token_index[r]))


def test_packed_zigzag_gives_rank_r_chunks_r_and_its_mirror() -> None:
    """A document of 2*cp*c tokens: rank r holds its chunks r and 2*cp-1-r, in order."""
    shards = packed_shards(_boundaries([16, 8]), 1, 24, 2, "zigzag")
    assert shards.token_index[0, 0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 22, 23]
    assert shards.token_index[1, 0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 18, 19, 20, 21]
