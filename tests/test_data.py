"""Tokenizer, document reading, plain windows and the stateful per-dp-rank loader.

References are built independently here: the token stream from `Tokenizer.encode` per document,
the windows by slicing that stream, the global batch from a single-process loader.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from tests.chat_utils import one_line_error
from titan_cp.config.schema import Training
from titan_cp.data import Batch, Tokenizer, build_dataloader
from titan_cp.data.documents import read_documents

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = REPO / "assets/tokenizer/tokenizer.json"
WORDS = "the quick brown fox jumps over a lazy dog while seven kings sing of old rivers".split()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(SHIPPED_TOKENIZER)


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    """Thirty documents of uneven length, about 700 tokens in all."""
    path = tmp_path / "corpus.jsonl"
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 40)))}) for _ in range(30)]
    path.write_text("\n".join(lines) + "\n")
    return path


def training(path: Path, **kw) -> Training:
    return Training(**{"dataset_path": str(path), "seq_len": 16, "local_batch_size": 2, **kw})


def take(loader, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


def stream_of(path: Path, tok: Tokenizer) -> torch.Tensor:
    ids: list[int] = []
    for doc in read_documents(path):
        ids += [tok.bos_id, *tok.encode(doc), tok.eos_id]
    return torch.tensor(ids)


# --- tokenizer ---------------------------------------------------------------------------------


def test_shipped_tokenizer(tok: Tokenizer) -> None:
    assert SHIPPED_TOKENIZER.stat().st_size < 1_000_000
    assert tok.vocab_size == 2048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "First Citizen:\nBefore we proceed, hear me speak. Ünïcödé too."
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_build_tokenizer_reproduces_the_asset(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    subprocess.run(
        [sys.executable, "scripts/build_tokenizer.py", "--output", str(out)], cwd=REPO, check=True, capture_output=True
    )
    assert out.read_bytes() == SHIPPED_TOKENIZER.read_bytes()


def save_word_tokenizer(path: Path, specials: list[str]) -> Path:
    vocab = {w: i for i, w in enumerate(specials + ["hello", "world", "[UNK]"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    return path


def test_tokenizer_falls_back_to_s_names_and_eos_padding(tmp_path: Path) -> None:
    t = Tokenizer(save_word_tokenizer(tmp_path / "t.json", ["<unk>", "<s>", "</s>"]))
    assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (1, 2, 2, 6)
    assert t.encode("hello world") == [3, 4]


def test_tokenizer_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    one_line_error(lambda: Tokenizer(missing), "model.tokenizer_path", str(missing), "does not exist")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    one_line_error(lambda: Tokenizer(garbage), str(garbage), "not a Hugging Face tokenizer.json")
    no_bos = save_word_tokenizer(tmp_path / "nobos.json", ["</s>"])
    one_line_error(lambda: Tokenizer(no_bos), str(no_bos), "no BOS token", "<|begin_of_text|>")


# --- documents ---------------------------------------------------------------------------------


def test_txt_documents_split_at_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("A:\nfirst line\nsecond\n\nB:\n  indented\n \t \n\n\nC: last\r\n\r\nD\n")
    assert read_documents(path) == ["A:\nfirst line\nsecond", "B:\n  indented", "C: last", "D"]


def test_shipped_corpus_has_many_uneven_documents() -> None:
    docs = read_documents(REPO / "assets/data/tinyshakespeare.txt")
    lengths = sorted(len(d) for d in docs)
    assert len(docs) > 5000
    assert lengths[-1] > 20 * lengths[len(lengths) // 2]
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_folder_reads_txt_and_jsonl_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("three\n\nfour")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two\\n\\nstill two", "id": 7}\n')
    (tmp_path / "notes.md").write_text("ignored")
    assert read_documents(tmp_path) == ["one", "two\n\nstill two", "three", "four"]


def test_bad_dataset_inputs(tmp_path: Path, tok: Tokenizer) -> None:
    def build(path: Path, **kw):
        return lambda: build_dataloader(training(path, **kw), tok, 0, 1, 0)

    missing = tmp_path / "missing.txt"
    one_line_error(build(missing), "training.dataset_path", str(missing), "does not exist")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ok".encode("latin-1"))
    one_line_error(build(latin1), str(latin1), "not UTF-8", "byte offset 3")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    one_line_error(build(bad_json), str(bad_json), "line 2", "not JSON")
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    one_line_error(build(no_text), str(no_text), "line 3", "'text'")
    wrong_type = tmp_path / "data.csv"
    wrong_type.write_text("a,b")
    one_line_error(build(wrong_type), str(wrong_type), ".txt", ".jsonl")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    one_line_error(build(empty_dir), str(empty_dir), "no .jsonl", ".txt files")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    one_line_error(build(blank), str(blank), "has 0 tokens", "17 needed")
    short = tmp_path / "short.txt"
    short.write_text("hello there")
    for packing in (False, True):
        message = one_line_error(build(short, sample_packing=packing), str(short), "17 needed")
        found = len(tok.encode("hello there")) + 2
        assert f"has {found} tokens" in message


# --- windows -----------------------------------------------------------------------------------


def test_windows_shift_positions_and_cover_the_stream(jsonl_corpus: Path, tok: Tokenizer) -> None:
    stream = stream_of(jsonl_corpus, tok)
    # A document's BOS is predicted from nothing of its own: its label slot holds -100.
    targets = torch.where(stream == tok.bos_id, -100, stream)
    seq_len = 16
    num_windows = (len(stream) - 1) // seq_len
    in_order = [
        tuple(stream[i * seq_len : (i + 1) * seq_len].tolist()) + tuple(targets[i * seq_len + 1 : (i + 1) * seq_len + 1].tolist())
        for i in range(num_windows)
    ]
    assert len(set(in_order)) == num_windows  # windows are distinct, so the epoch check below is exact

    loader = build_dataloader(training(jsonl_corpus, local_batch_size=1), tok, 0, 1, seed=3)
    seen = []
    for _ in range(num_windows):
        batch = next(loader)
        assert batch.tokens.shape == batch.labels.shape == batch.positions.shape == (1, seq_len)
        assert batch.tokens.dtype == batch.labels.dtype == batch.positions.dtype == torch.int64
        assert torch.equal(batch.positions[0], torch.arange(seq_len))
        seen.append(tuple(batch.tokens[0].tolist()) + tuple(batch.labels[0].tolist()))
    # One epoch reads every window once, each label the stream's next token unless that is a BOS.
    assert sorted(seen) == sorted(in_order)
    assert seen != in_order  # shuffled


def test_same_seed_same_stream_other_seed_other_order(jsonl_corpus: Path, tok: Tokenizer) -> None:
    a = take(build_dataloader(training(jsonl_corpus), tok, 0, 1, seed=5), 30)
    b = take(build_dataloader(training(jsonl_corpus), tok, 0, 1, seed=5), 30)
    c = take(build_dataloader(training(jsonl_corpus), tok, 0, 1, seed=6), 30)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert not all(torch.equal(x.tokens, z.tokens) for x, z in zip(a, c))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_same_batches(jsonl_corpus: Path, tok: Tokenizer, packing: bool) -> None:
    cfg = training(jsonl_corpus, sample_packing=packing)
    # 60 micro-batches x 2 ranks x 2 = 240 samples: several epochs of the 65, so reshuffles are covered.
    straight = take(build_dataloader(cfg, tok, 1, 2, seed=1), 60)
    first = build_dataloader(cfg, tok, 1, 2, seed=1)
    take(first, 37)
    state = json.loads(json.dumps(first.state_dict()))  # plain values, as a checkpoint stores them
    resumed = build_dataloader(cfg, tok, 1, 2, seed=1)
    resumed.load_state_dict(state)
    for expected, got in zip(straight[37:], take(resumed, 23)):
        for e, g in zip(expected.as_tuple(), got.as_tuple()):
            assert torch.equal(e, g)


def test_resume_with_other_dp_continues_the_global_stream(jsonl_corpus: Path, tok: Tokenizer) -> None:
    single = build_dataloader(training(jsonl_corpus, local_batch_size=4), tok, 0, 1, seed=2)
    expected = take(single, 5)[3:]
    two = build_dataloader(training(jsonl_corpus), tok, 0, 2, seed=2)
    take(two, 3)
    state = two.state_dict()
    ranks = [build_dataloader(training(jsonl_corpus), tok, r, 2, seed=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for exp in expected:
        got = torch.cat([next(r).tokens for r in ranks])
        assert torch.equal(got, exp.tokens)


def test_resume_refuses_a_different_stream(jsonl_corpus: Path, tok: Tokenizer) -> None:
    state = build_dataloader(training(jsonl_corpus), tok, 0, 1, seed=0).state_dict()
    other = build_dataloader(training(jsonl_corpus, seq_len=8), tok, 0, 1, seed=0)
    one_line_error(lambda: other.load_state_dict(state), "checkpoint", "seq_len=16")
    odd = {**state, "samples_consumed": 3}
    two = build_dataloader(training(jsonl_corpus), tok, 0, 2, seed=0)
    one_line_error(lambda: two.load_state_dict(odd), "3 samples", "= 4")


def global_batches(path: Path, tok: Tokenizer, dp: int, local: int, steps: int, packing: bool) -> list:
    """Per optimizer step: all micro-batches of all ranks, concatenated in (micro-step, rank) order."""
    global_batch = 8
    accum = global_batch // (dp * local)
    cfg = training(path, local_batch_size=local, global_batch_size=global_batch, sample_packing=packing)
    loaders = [build_dataloader(cfg, tok, r, dp, seed=4) for r in range(dp)]
    out = []
    for _ in range(steps):
        micro = [next(loader) for _ in range(accum) for loader in loaders]
        out.append({name: torch.cat([getattr(b, name) for b in micro]) for name in ("tokens", "labels", "positions")})
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_global_batch_is_the_same_for_any_dp_and_accumulation(
    jsonl_corpus: Path, tok: Tokenizer, packing: bool
) -> None:
    steps = 20  # 160 samples: more than two epochs of the 65 samples
    reference = global_batches(jsonl_corpus, tok, dp=1, local=8, steps=steps, packing=packing)
    for dp, local in [(1, 2), (2, 2), (4, 2), (4, 1), (8, 1), (2, 4)]:
        run = global_batches(jsonl_corpus, tok, dp=dp, local=local, steps=steps, packing=packing)
        for expected, got in zip(reference, run):
            for name in expected:
                assert torch.equal(expected[name], got[name]), (dp, local, name)


def test_dp_ranks_read_disjoint_samples(jsonl_corpus: Path, tok: Tokenizer) -> None:
    loaders = [build_dataloader(training(jsonl_corpus, local_batch_size=1), tok, r, 4, seed=0) for r in range(4)]
    per_epoch = len(loaders[0].samples)
    for epoch in range(2):  # each epoch reads every sample once
        reads = [loaders[0].sample_index(epoch * per_epoch + i) for i in range(per_epoch)]
        assert sorted(reads) == list(range(per_epoch))
    steps = per_epoch // 4
    rows = {r: [tuple(next(loaders[r]).tokens[0].tolist()) for _ in range(steps)] for r in range(4)}
    everything = [row for r in range(4) for row in rows[r]]
    assert len(set(everything)) == len(everything)


def test_same_dp_rank_same_batches_for_a_cp_group(jsonl_corpus: Path, tok: Tokenizer) -> None:
    a, b = (build_dataloader(training(jsonl_corpus), tok, 1, 2, seed=0) for _ in range(2))
    for x, y in zip(take(a, 5), take(b, 5)):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
