"""Every file type gives the same records, and so the same ids and masks, for every format.

The reference is the list of records itself, written here to .jsonl, .jsonl.gz, .json,
.parquet, a save_to_disk folder (built with pyarrow as `datasets` writes it: Arrow stream files
listed in state.json), a DatasetDict folder and a folder of parts.
"""

import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.chat_utils import CHATML_STYLE, CONVERSATIONS, one_line_error, tokenizer_folder
from titan_cp.data.formats import Encoder, encode_dataset
from titan_cp.data.records import dataset_files, iter_records
from titan_cp.data.tokenizer import Tokenizer

RECORDS = {
    "chat": [{"messages": m} for m in CONVERSATIONS * 2],
    "alpaca": [
        {"instruction": "Who speaks?", "input": "Before we proceed", "output": "First Citizen"},
        {"instruction": "Say hi.", "input": None, "output": "Hi."},
        {"instruction": "Count.", "input": "", "output": "One, two"},
    ],
    "prompt_completion": [{"prompt": f"Line {i}:", "completion": f" answer {i}"} for i in range(5)],
    "text": [{"text": "First Citizen:\nSpeak."}, {"text": "Ünïcödé \u2028 line separator"}, {"text": "x"}],
}


def without_nones(value):
    if isinstance(value, dict):
        return {k: without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nones(v) for v in value]
    return value


def write_all(folder, records) -> dict:
    """The records in every file type; returns {type: path}."""
    folder.mkdir()
    lines = "".join(json.dumps(r) + "\n" for r in records)
    paths = {"jsonl": folder / "d.jsonl", "gz": folder / "d.jsonl.gz", "json": folder / "d.json"}
    paths["jsonl"].write_text(lines)
    with gzip.open(paths["gz"], "wt") as f:
        f.write(lines)
    paths["json"].write_text(json.dumps(records, indent=1))
    table = pa.Table.from_pylist(records)
    paths["parquet"] = folder / "d.parquet"
    pq.write_table(table, paths["parquet"], row_group_size=2)
    paths["save_to_disk"] = save_to_disk(folder / "disk", table)
    (folder / "dict").mkdir()
    (folder / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    save_to_disk(folder / "dict" / "train", table)
    paths["dataset_dict"] = folder / "dict"
    parts = folder / "parts"
    (parts / "b").mkdir(parents=True)
    (parts / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:1]))
    (parts / "b" / "c.json").write_text(json.dumps(records[1:]))
    paths["folder"] = parts
    return paths


def save_to_disk(folder, table: pa.Table):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream shards listed in state.json."""
    folder.mkdir()
    names = []
    for shard, rows in enumerate([table.slice(0, 2), table.slice(2)]):
        names.append(f"data-{shard:05d}-of-00002.arrow")
        with pa.OSFile(str(folder / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(rows)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_file_type_reads_the_same_records_and_documents(tmp_path, fmt) -> None:
    records = RECORDS[fmt]
    tok = Tokenizer(tokenizer_folder(tmp_path / "tok", CHATML_STYLE))
    expected = Encoder(tok, fmt).encode_batch(records)
    for kind, path in write_all(tmp_path / "data", records).items():
        # Table rows carry every column (struct field), with None where a record lacks the key.
        assert without_nones([r.data for r in iter_records(path)]) == without_nones(records), kind
        assert list(encode_dataset(path, "auto", tok, "auto", batch_size=2)) == expected, kind


def test_records_name_their_file_and_line(tmp_path) -> None:
    paths = write_all(tmp_path / "data", RECORDS["text"])
    paths["jsonl"].write_text('\n{"text": "a"}\n\n  \n{"text": "b"}\n')
    assert [r.where for r in iter_records(paths["jsonl"])] == [f"{paths['jsonl']} line 2", f"{paths['jsonl']} line 5"]
    assert [r.where for r in iter_records(paths["json"])][-1] == f"{paths['json']} record 3"
    assert [r.where for r in iter_records(paths["parquet"])][-1] == f"{paths['parquet']} row 3"
    disk = [r.where for r in iter_records(paths["save_to_disk"])]
    assert disk[1].endswith("data-00000-of-00002.arrow row 2") and disk[2].endswith("data-00001-of-00002.arrow row 1")
    txt = tmp_path / "a.txt"
    txt.write_text("A:\nhi\n\n\nB:\nho\n")
    assert [(r.data["text"], r.where) for r in iter_records(txt)] == [("A:\nhi", f"{txt} line 1"), ("B:\nho", f"{txt} line 5")]
    assert dataset_files(paths["folder"]) == [paths["folder"] / "a.jsonl", paths["folder"] / "b" / "c.json"]


def test_json_lines_in_a_json_file_are_read_as_lines(tmp_path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [(r.data["text"], r.where) for r in iter_records(path)] == [("a", f"{path} line 1"), ("b", f"{path} line 2")]


def test_bad_files(tmp_path, monkeypatch) -> None:
    def read(path):
        return lambda: list(iter_records(path))

    not_list = tmp_path / "obj.json"
    not_list.write_text('  [1, 2]')
    one_line_error(read(not_list), str(not_list), "record 1", "not a JSON object")
    bad_gz = tmp_path / "bad.jsonl.gz"
    bad_gz.write_text("plain text")
    one_line_error(read(bad_gz), str(bad_gz), "gzip")
    bad_utf8 = tmp_path / "bad.jsonl"
    first, second = b'{"text": "a"}\n', b'{"text": "caf\xe9"}\n'
    bad_utf8.write_bytes(first + second)
    offset = len(first) + second.index(b"\xe9")
    one_line_error(read(bad_utf8), str(bad_utf8), "line 2", "not UTF-8", f"byte offset {offset}")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text("nope")
    one_line_error(read(bad_parquet), str(bad_parquet), "not a Parquet file")
    split_less = tmp_path / "dd"
    split_less.mkdir()
    (split_less / "dataset_dict.json").write_text('{"splits": ["test"]}')
    one_line_error(read(split_less), str(split_less), "without a 'train' split", "splits: test")
    one_line_error(read(tmp_path / "nothing"), "does not exist")
    (tmp_path / "data.csv").write_text("a,b")
    one_line_error(read(tmp_path / "data.csv"), "data.csv", ".parquet")

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a"}]), good)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    one_line_error(read(good), str(good), "needs pyarrow", "titan_cp[parquet]")
