"""The token cache: built once, reused while its inputs are unchanged, rebuilt when one changes,
never left half-written, and the same for any number of prepare_data workers."""

import json
import random
from pathlib import Path

import pytest

from tests.script_utils import load_script
from titan_cp.config.schema import Training
from titan_cp.data import Tokenizer
from titan_cp.data.cache import TokenCache, to_arrays, write_cache
from titan_cp.data.encode_pool import TextEncoder
from titan_cp.data.loader import build_samples

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets/tokenizer/tokenizer.json"
WORDS = "the quick brown fox jumps over a lazy dog while seven kings sing of old rivers".split()


def write_jsonl(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 40)))}) + "\n" for _ in range(count)))
    return path


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """Counts the records encoded by TextEncoder in this process."""
    calls: list[int] = []
    original = TextEncoder.encode_batch

    def counting(self, records):
        calls.append(len(records))
        return original(self, records)

    monkeypatch.setattr(TextEncoder, "encode_batch", counting)
    return calls


def samples_of(data: Path, tokenizer_path: Path, cache_dir: Path, packing: bool = True):
    training = Training(dataset_path=str(data), dataset_cache_dir=str(cache_dir), seq_len=16, sample_packing=packing)
    return build_samples(str(data), "training.dataset_path", training, Tokenizer(tokenizer_path))


def test_reused_while_unchanged_rebuilt_when_an_input_changes(tmp_path: Path, encode_calls: list[int]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", 40)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(TOKENIZER.read_bytes())
    cache_dir = tmp_path / "caches"

    first = samples_of(data, tokenizer, cache_dir)
    assert sum(encode_calls) == 40
    again = samples_of(data, tokenizer, cache_dir)
    assert sum(encode_calls) == 40  # no record encoded again
    assert again.cache.folder == first.cache.folder
    assert [again[i][0].tolist() for i in range(len(again))] == [first[i][0].tolist() for i in range(len(first))]
    unpacked = samples_of(data, tokenizer, cache_dir, packing=False)
    assert sum(encode_calls) == 40 and unpacked.cache.folder == first.cache.folder  # packing is not in the key

    # The same tokenizer written differently is another file: rebuilt (the key hashes the bytes).
    tokenizer.write_text(json.dumps(json.loads(TOKENIZER.read_text()), indent=1))
    retokenized = samples_of(data, tokenizer, cache_dir)
    assert sum(encode_calls) == 80 and retokenized.cache.folder != first.cache.folder
    assert retokenized.cache.digest == first.cache.digest  # same tokens, so a checkpoint may resume

    with data.open("a") as f:
        f.write(json.dumps({"text": "one more record"}) + "\n")
    grown = samples_of(data, tokenizer, cache_dir)
    assert sum(encode_calls) == 121 and grown.cache.num_documents == 41
    assert grown.cache.folder not in (first.cache.folder, retokenized.cache.folder)
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (first.cache.folder, retokenized.cache.folder, grown.cache.folder)
    )


def test_a_failed_build_leaves_nothing_that_looks_valid(tmp_path: Path) -> None:
    def batches():
        yield to_arrays([([0, 5, 6, 1], [False, True, True, True])])
        raise KeyboardInterrupt  # a crash in the middle of the data

    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "key", batches(), dict)
    assert list(tmp_path.iterdir()) == []
    write_cache(tmp_path / "key", iter([to_arrays([([0, 5, 1], [True, True, True])])]), dict)
    cache = TokenCache(tmp_path / "key")
    assert (cache.num_tokens, cache.num_targets) == (3, 2)  # a document's first token is never a target


def test_prepare_data_workers_write_the_cache_a_run_reuses(tmp_path: Path, encode_calls: list[int]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", 5000, seed=3)  # 3 batches of records, 2 for the workers
    prepare = load_script("prepare_data")
    overrides = ["--training.dataset_path", str(data), "--model.tokenizer_path", str(TOKENIZER)]
    parallel = tmp_path / "parallel"
    assert prepare.main([*overrides, "--training.dataset_cache_dir", str(parallel), "--workers", "2"]) == 0
    assert len(encode_calls) == 1  # the first batch here (it fixes the format), the others in the workers
    in_process = samples_of(data, TOKENIZER, tmp_path / "in_process")
    encoded = sum(encode_calls)
    reused = samples_of(data, TOKENIZER, parallel)
    assert sum(encode_calls) == encoded  # the run encodes nothing
    assert reused.cache.folder.name == in_process.cache.folder.name
    for name in ("tokens.bin", "mask.bin", "offsets.npy"):
        assert (reused.cache.folder / name).read_bytes() == (in_process.cache.folder / name).read_bytes(), name
    assert (reused.cache.folder / "plans" / "pack-16-split.npz").is_file()  # the plan was not rebuilt either
