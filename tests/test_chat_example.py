"""The shipped chat example (reproducible, every conversation has targets) and scripts/show_targets.py."""

import json
import subprocess
import sys

from tests.chat_utils import CHATML_STYLE, CONVERSATIONS, LLAMA3_STYLE, REPO, tokenizer_folder
from tests.script_utils import load_script
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


def test_show_targets_marks_the_answers(tmp_path) -> None:
    folder = tokenizer_folder(tmp_path / "tok", CHATML_STYLE)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    shown = load_script("show_targets").show(str(data), str(folder), 1, "auto", "auto")
    header, text = shown.split("\n", 1)
    assert header.startswith(f"== {data} line 1 (chat): ") and header.endswith(" targets")
    assert text.count("[[") == 3
    assert "\n[[hello<|im_end|>]]\n" in text and "<|im_start|>user\nThanks<|im_end|>\n" in text
