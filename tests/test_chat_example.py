"""The shipped chat example: reproducible from its script, and every conversation has targets."""

import subprocess
import sys

from tests.chat_utils import LLAMA3_STYLE, REPO, tokenizer_folder
from titan_cp.data.formats import encode_dataset
from titan_cp.data.records import iter_records
from titan_cp.data.tokenizer import Tokenizer

EXAMPLE = REPO / "assets/data/chat_example.jsonl"


def test_script_reproduces_the_asset(tmp_path) -> None:
    out = tmp_path / "chat.jsonl"
    subprocess.run([sys.executable, "scripts/make_chat_example.py", "--output", str(out)], cwd=REPO, check=True)
    assert out.read_bytes() == EXAMPLE.read_bytes()


def test_every_conversation_has_targets_and_prompts(tmp_path) -> None:
    tok = Tokenizer(tokenizer_folder(tmp_path / "tok", LLAMA3_STYLE))
    documents = list(encode_dataset(EXAMPLE, "auto", tok))
    assert len(documents) == 300
    for ids, mask in documents:
        assert 0 < sum(mask) < len(ids) - 10
    conversations = [r.data["messages"] for r in iter_records(EXAMPLE)]
    assert sum(m[0]["role"] == "system" for m in conversations) >= 50
    assert sum([x["role"] for x in m].count("assistant") >= 2 for m in conversations) >= 50
