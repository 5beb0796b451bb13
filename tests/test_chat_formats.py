"""Chat, alpaca, prompt_completion and text records -> ids and target masks.

References: transformers' `apply_chat_template` on the same tokenizer folder (rendered text,
token ids, and `return_assistant_tokens_mask` on templates with `{% generation %}` markers),
and transformers' tokenizer for the plain formats.
"""

import json

import pytest

from tests.chat_utils import (
    CHATML_STYLE,
    CONVERSATIONS,
    LLAMA3_STYLE,
    NO_SYSTEM_STYLE,
    REASONING_STYLE,
    SHIPPED_TOKENIZER,
    hf_tokenizer,
    one_line_error,
    tokenizer_folder,
)
from titan_cp.data.chat_template import compile_template, render
from titan_cp.data.formats import Encoder, encode_dataset
from titan_cp.data.tokenizer import Tokenizer

# (template, where it is stored, conversations it accepts)
TEMPLATES = {
    "llama3_config": (LLAMA3_STYLE, "config", CONVERSATIONS),
    "llama3_jinja_file": (LLAMA3_STYLE, "file", CONVERSATIONS),
    "chatml_named_list": (CHATML_STYLE, "named", CONVERSATIONS),
    "no_system": (NO_SYSTEM_STYLE, "config", CONVERSATIONS[1:]),
    "reasoning": (REASONING_STYLE, "config", CONVERSATIONS),
}


def folder_for(tmp_path, name: str):
    template, stored, conversations = TEMPLATES[name]
    if stored == "named":  # the list-of-named-templates form: the "default" one is used
        config = {"chat_template": [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}]}
        return tokenizer_folder(tmp_path / name, config=config), conversations
    return tokenizer_folder(tmp_path / name, template, template_file=stored == "file"), conversations


def end_of_turn_rule(assistant_mask: list[int]) -> list[bool]:
    """The assistant tokens plus the token right after each run of them."""
    out = [bool(m) for m in assistant_mask]
    for i in range(len(assistant_mask) - 1):
        if assistant_mask[i] and not assistant_mask[i + 1]:
            out[i + 1] = True
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_rendering_and_ids_equal_apply_chat_template(tmp_path, name) -> None:
    folder, conversations = folder_for(tmp_path, name)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    assert tok.chat_template == hf.chat_template if isinstance(hf.chat_template, str) else hf.chat_template["default"]
    encoder = Encoder(tok, "chat", "true")
    for messages in conversations:
        for generation_prompt in (False, True):
            text = render(compile_template(tok.chat_template), messages, tok.special_tokens, generation_prompt)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        [(ids, mask)] = encoder.encode_batch([{"messages": messages}])
        assert ids == hf.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert mask == [False] + [True] * (len(ids) - 1)


@pytest.mark.parametrize("name", ["llama3_jinja_file", "chatml_named_list", "reasoning"])
def test_targets_are_the_assistant_spans_and_the_end_of_turn_token(tmp_path, name) -> None:
    folder, conversations = folder_for(tmp_path, name)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    records = [{"messages": m} for m in conversations]
    for (ids, mask), messages in zip(Encoder(tok, "auto", "auto").encode_batch(records), conversations):
        reference = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == reference["input_ids"]
        assert mask == end_of_turn_rule(reference["assistant_masks"])
        assert any(mask) and not all(mask[1:])
        turn_ends = {ids[i] for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])}
        assert turn_ends == set(tok.encode("<|eot_id|>" if "llama3" in name else "<|im_end|>"))
    if name == "reasoning":  # the rendered answer has no reasoning, and is found all the same
        ids, mask = Encoder(tok, "chat").encode_batch([{"messages": conversations[-1]}])[0]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A Roman general.<|im_end|>"


def test_alpaca_goes_through_the_template_as_one_user_and_one_assistant_turn(tmp_path) -> None:
    folder = tokenizer_folder(tmp_path / "f", CHATML_STYLE)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    records = [
        {"instruction": "Name the speaker.", "input": "Before we proceed", "output": "First Citizen"},
        {"instruction": "Say hi.", "output": "Hi."},
    ]
    turns = [
        [{"role": "user", "content": "Name the speaker.\n\nBefore we proceed"}, {"role": "assistant", "content": "First Citizen"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
    ]
    for (ids, mask), messages, record in zip(Encoder(tok, "alpaca").encode_batch(records), turns, records):
        reference = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == reference["input_ids"]
        assert mask == end_of_turn_rule(reference["assistant_masks"])
        assert hf.decode([i for i, m in zip(ids, mask) if m]) == record["output"] + "<|im_end|>"


def test_plain_prompt_formats_without_a_template(tmp_path) -> None:
    tok = Tokenizer(SHIPPED_TOKENIZER)
    hf = hf_tokenizer(tokenizer_folder(tmp_path / "plain"))
    bos, eos = hf.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    cases = [
        ("alpaca", {"instruction": "Who?", "input": "Line one", "output": "MENENIUS"},
         "### Instruction:\nWho?\n\n### Input:\nLine one\n\n### Response:\n", "MENENIUS"),
        ("alpaca", {"instruction": "Who?", "output": "MENENIUS"}, "### Instruction:\nWho?\n\n### Response:\n", "MENENIUS"),
        ("prompt_completion", {"prompt": "ROMEO: But soft,", "completion": " what light"}, "ROMEO: But soft,", " what light"),
    ]
    for fmt, record, prompt, completion in cases:
        [(ids, mask)] = Encoder(tok, fmt).encode_batch([record])
        assert ids == [bos] + hf(prompt + completion, add_special_tokens=False)["input_ids"] + [eos]
        assert hf.decode([i for i, m in zip(ids, mask) if m]) == completion + "<|end_of_text|>"
        assert not mask[0] and not all(mask[1:])
        [(_, all_targets)] = Encoder(tok, fmt, "true").encode_batch([record])
        assert all_targets == [False] + [True] * (len(ids) - 1)


def test_text_records_are_bos_tokens_eos_all_targets(tmp_path) -> None:
    folder = tokenizer_folder(tmp_path / "f", CHATML_STYLE)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    texts = ["First Citizen:\nSpeak, speak.", "x"]
    out = Encoder(tok, "text", "false").encode_batch([{"text": t} for t in texts] + [{"text": ""}])
    for (ids, mask), text in zip(out, texts):
        assert ids == hf("<|begin_of_text|>" + text + "<|end_of_text|>", add_special_tokens=False)["input_ids"]
        assert mask == [False] + [True] * (len(ids) - 1)
    assert out[2] == ([], [])


def test_a_folder_without_bos_writes_no_bos(tmp_path) -> None:
    folder = tokenizer_folder(tmp_path / "f", config={"bos_token": None, "eos_token": "<|im_end|>"})
    tok = Tokenizer(folder)
    assert tok.bos_id is None and tok.eos_token == "<|im_end|>"
    [(ids, mask)] = Encoder(tok, "prompt_completion").encode_batch([{"prompt": "Hail,", "completion": " Caesar"}])
    assert ids == tok.encode("Hail, Caesar") + [tok.eos_id]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Caesar<|im_end|>"


def test_fingerprint_follows_template_format_and_tokenizer(tmp_path) -> None:
    a = Tokenizer(tokenizer_folder(tmp_path / "a", CHATML_STYLE))
    b = Tokenizer(tokenizer_folder(tmp_path / "b", CHATML_STYLE + " "))
    base = Encoder(a, "chat").fingerprint()
    assert base == Encoder(Tokenizer(tmp_path / "a"), "chat").fingerprint()
    assert base != Encoder(b, "chat").fingerprint()
    assert base != Encoder(a, "auto").fingerprint()
    assert base != Encoder(a, "chat", "true").fingerprint()
    assert json.loads(json.dumps(base)) == base


# --- bad input: one line naming the file and line -----------------------------------------------


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_bad_records_name_file_and_line(tmp_path) -> None:
    folder = tokenizer_folder(tmp_path / "f", NO_SYSTEM_STYLE)
    tok = Tokenizer(folder)
    chat = {"messages": CONVERSATIONS[1]}

    def encode(path, fmt="auto", train_on_inputs="auto"):
        return lambda: list(encode_dataset(path, fmt, tok, train_on_inputs, batch_size=2))

    missing = write_jsonl(tmp_path / "missing.jsonl", [chat, {"text": "x"}, {"msgs": []}])
    one_line_error(encode(missing, "alpaca"), missing, "line 1", "format chat in a dataset of format alpaca")
    one_line_error(encode(missing, "chat"), missing, "line 2", "format text in a dataset of format chat")
    no_fields = write_jsonl(tmp_path / "no_fields.jsonl", [chat, chat, {"msgs": []}])
    one_line_error(encode(no_fields), no_fields, "line 3", "needs 'messages'", "found missing")
    one_line_error(encode(write_jsonl(tmp_path / "u.jsonl", [{"msgs": 1}])), "u.jsonl line 1", "none of the fields")
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [chat, {"instruction": "a", "output": "b"}])
    one_line_error(encode(mixed), mixed, "line 2", "format alpaca in a dataset of format chat", f"auto took it from {mixed} line 1")
    system = write_jsonl(tmp_path / "system.jsonl", [chat, {"messages": CONVERSATIONS[0]}])
    one_line_error(encode(system), system, "line 2", str(folder / "tokenizer_config.json"), "System role not supported")
    bad_role = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"content": "hi"}]}])
    one_line_error(encode(bad_role), bad_role, "line 1", "message 1", "'role'")
    one_line_error(lambda: Encoder(Tokenizer(SHIPPED_TOKENIZER), "chat").encode_batch([chat]), str(SHIPPED_TOKENIZER),
             "no chat template")
    one_line_error(lambda: Encoder(tok, "csv"), "training.dataset_format", "prompt_completion")

    rewrites = Tokenizer(tokenizer_folder(tmp_path / "upper", "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"))
    path = write_jsonl(tmp_path / "upper.jsonl", [chat])
    one_line_error(encode_with(rewrites, path), path, "message 2 (assistant)", "train_on_inputs = true")
    assert list(encode_dataset(path, "chat", rewrites, "true"))  # with every token a target, nothing to locate

    broken = tokenizer_folder(tmp_path / "broken", "{% for m in messages %}")
    one_line_error(lambda: Encoder(Tokenizer(broken), "chat"), str(broken / "tokenizer_config.json"), "not valid Jinja")


def encode_with(tok, path):
    return lambda: list(encode_dataset(path, "chat", tok))


def test_a_conversation_that_renders_to_nothing_is_an_empty_document(tmp_path) -> None:
    tok = Tokenizer(tokenizer_folder(tmp_path / "f", "{% for m in messages if m['role'] == 'tool' %}x{% endfor %}"))
    assert Encoder(tok, "chat", "true").encode_batch([{"messages": CONVERSATIONS[2]}]) == [([], [])]
    assert list(encode_dataset(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATIONS[2]}]), "chat", tok, "true")) == []
