"""The token cache: built once, reused while its inputs are unchanged, rebuilt when one changes
(data file, tokenizer file, chat template), never left half-written, and the same for any number
of prepare_data workers. Samples read from it equal samples built in memory straight from the
encoder's output, for chat data with target masks, with and without packing, for each
truncation; a parquet file gives the same samples as the jsonl file with the same records."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.chat_utils import CHATML_STYLE, LLAMA3_STYLE, tokenizer_folder
from tests.script_utils import load_script
from titan_cp.config.schema import Training
from titan_cp.data import Tokenizer
from titan_cp.data.cache import to_arrays, write_cache
from titan_cp.data.cache_reader import TokenCache
from titan_cp.data.formats import Encoder
from titan_cp.data.loader import build_samples
from titan_cp.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets/tokenizer/tokenizer.json"
WORDS = "the quick brown fox jumps over a lazy dog while seven kings sing of old rivers".split()


def write_jsonl(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 40)))}) + "\n" for _ in range(count)))
    return path


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """Counts the records encoded by Encoder in this process."""
    calls: list[int] = []
    original = Encoder.encode_batch

    def counting(self, records):
        calls.append(len(records))
        return original(self, records)

    monkeypatch.setattr(Encoder, "encode_batch", counting)
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


# --- chat data through the cache ----------------------------------------------------------------


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choices(WORDS, k=rng.randint(1, k)))  # noqa: E731
    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": say(6)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": say(12)}, {"role": "assistant", "content": say(20)}]
        records.append({"messages": messages})
    return records


def reference_documents(records: list[dict], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per document straight from the encoder, in memory: label j is ids[j + 1] where
    that token is a target, else -100."""
    out = []
    for ids, mask in Encoder(tokenizer, "chat", "false").encode_batch(records):
        labels = [ids[j + 1] if mask[j + 1] else -100 for j in range(len(ids) - 1)] + [-100]
        out.append((ids, labels))
    return out


def reference_windows(documents, seq_len: int) -> list[tuple[list[int], list[int]]]:
    stream = [t for ids, _ in documents for t in ids]
    # Across a document boundary the label is -100: a document's first token is never a target.
    labels = [label for _, doc_labels in documents for label in doc_labels]
    count = (len(stream) - 1) // seq_len
    return [(stream[i * seq_len : (i + 1) * seq_len], labels[i * seq_len : (i + 1) * seq_len]) for i in range(count)]


def reference_pieces(documents, seq_len: int, truncation: str) -> Counter:
    pieces: Counter = Counter()
    for ids, labels in documents:
        if truncation == "drop" and len(ids) > seq_len:
            continue
        starts = range(0, len(ids), seq_len) if truncation == "split" else [0]
        for s in starts:
            pieces[(tuple(ids[s : s + seq_len]), tuple(labels[s : s + seq_len]))] += 1
    return pieces


def packed_pieces(samples) -> Counter:
    """The (tokens, labels) of every document piece in the packed samples, found from positions."""
    pieces: Counter = Counter()
    for i in range(len(samples)):
        tokens, labels, positions = (t.tolist() for t in samples[i])
        starts = [j for j, p in enumerate(positions) if p == 0] + [len(positions)]
        for s, e in zip(starts, starts[1:]):
            if e == len(positions) and set(tokens[s:e]) == {samples.pad_id} and set(labels[s:e]) == {-100}:
                continue  # the padding run at the end
            pieces[(tuple(tokens[s:e]), tuple(labels[s:e]))] += 1
    return pieces


def chat_samples(data: Path, folder: Path, cache_dir: Path, packing: bool, truncation: str = "auto", seq_len: int = 96):
    training = Training(
        dataset_path=str(data), dataset_cache_dir=str(cache_dir), seq_len=seq_len, sample_packing=packing,
        dataset_format="chat", train_on_inputs="false", truncation=truncation,
    )  # fmt: skip
    return build_samples(str(data), "training.dataset_path", training, Tokenizer(folder))


def test_chat_samples_from_the_cache_equal_samples_built_from_the_source(tmp_path: Path, encode_calls) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = conversations(24)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    folder = tokenizer_folder(tmp_path / "tok", LLAMA3_STYLE)
    documents = reference_documents(records, Tokenizer(folder))
    assert any(len(ids) > 96 for ids, _ in documents) and any(len(ids) <= 96 for ids, _ in documents)
    cache_dir = tmp_path / "caches"

    windows = chat_samples(jsonl, folder, cache_dir, packing=False)
    expected = reference_windows(documents, 96)
    assert len(windows) == len(expected)
    for i, (tokens, labels) in enumerate(expected):
        got = windows[i]
        assert got[0].tolist() == tokens and got[1].tolist() == labels, i
    for truncation in ("split", "truncate", "drop"):
        packed = chat_samples(jsonl, folder, cache_dir, packing=True, truncation=truncation)
        assert packed_pieces(packed) == reference_pieces(documents, 96, truncation), truncation
    assert chat_samples(jsonl, folder, cache_dir, packing=True).truncation == "truncate"  # auto, for chat

    # Parquet gives the same records, so the same samples, byte for byte.
    for packing in (False, True):
        a, b = (chat_samples(path, folder, cache_dir, packing) for path in (jsonl, parquet))
        assert len(a) == len(b)
        for i in range(len(a)):
            assert all(torch.equal(x, y) for x, y in zip(a[i], b[i])), (packing, i)

    # Another chat template: rebuilt.
    before = sum(encode_calls)
    tokenizer_folder(folder, CHATML_STYLE)
    rebuilt = chat_samples(jsonl, folder, cache_dir, packing=False)
    assert sum(encode_calls) == before + len(records)
    assert rebuilt.cache.folder != windows.cache.folder


def test_a_dataset_without_targets_is_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "no_answers.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": ""}]}) + "\n" for w in WORDS))
    folder = tokenizer_folder(tmp_path / "tok", LLAMA3_STYLE)
    with pytest.raises(UserError) as info:
        chat_samples(data, folder, tmp_path / "caches", packing=True)
    message = str(info.value)
    assert "\n" not in message and str(data) in message and "no target token" in message
    assert "training.train_on_inputs" in message


def test_a_node_leader_writes_its_status_while_another_leader_renames_its_own(tmp_path: Path, monkeypatch) -> None:
    """Two launches on one host (two "nodes"): a leader's sweep of old status files may list the
    other leader's temporary file just before it is renamed away; the sweep goes on without it."""
    from titan_cp.data import corpus

    renamed_away = tmp_path / f"{corpus._STATUS_PREFIX}other-node1.tmp"
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([renamed_away]))
    corpus._write_status(tmp_path / f"{corpus._STATUS_PREFIX}token-node0", "ok")
    assert (tmp_path / f"{corpus._STATUS_PREFIX}token-node0").read_text() == "ok"
