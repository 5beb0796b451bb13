"""Tokenizer from a Hugging Face folder: special tokens, template sources and files, against transformers."""

import json

from tests.chat_utils import (
    CHATML_STYLE,
    LLAMA3_STYLE,
    SHIPPED_TOKENIZER,
    hf_tokenizer,
    one_line_error,
    tokenizer_folder,
)
from titan_cp.data.tokenizer import Tokenizer


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def test_folder_special_tokens_agree_with_transformers(tmp_path) -> None:
    config = {"bos_token": added_token("<|im_start|>"), "eos_token": "<|im_end|>", "pad_token": None,
              "unk_token": "<|pad|>", "add_bos_token": False, "image_token": added_token("<|pad|>"),
              "eot_token": "<|eot_id|>", "max_length_token": 5}
    folder = tokenizer_folder(tmp_path / "f", CHATML_STYLE, config=config)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token)
    assert tok.special_tokens == hf.special_tokens_map
    assert tok.pad_id == tok.eos_id  # no pad token: EOS stands in (padding is never a target)
    assert tok.add_bos_token is False
    assert tok.vocab_size == len(hf)
    assert tok.encode("<|im_start|>user hi") == hf("<|im_start|>user hi", add_special_tokens=False)["input_ids"]
    assert tok.files == [folder / "tokenizer.json", folder / "tokenizer_config.json"]
    assert set(tok.file_hashes()) == {"tokenizer.json", "tokenizer_config.json"}


def test_template_sources(tmp_path) -> None:
    in_config = Tokenizer(tokenizer_folder(tmp_path / "a", CHATML_STYLE))
    assert in_config.chat_template == CHATML_STYLE
    assert in_config.chat_template_source == tmp_path / "a" / "tokenizer_config.json"
    # chat_template.jinja wins over the config's template, as in transformers 5
    both = tokenizer_folder(tmp_path / "b", LLAMA3_STYLE, template_file=True)
    config = json.loads((both / "tokenizer_config.json").read_text())
    (both / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML_STYLE}))
    tok = Tokenizer(both)
    assert tok.chat_template == LLAMA3_STYLE == hf_tokenizer(both).chat_template
    assert tok.files[-1] == tok.chat_template_source == both / "chat_template.jinja"
    bare = Tokenizer(SHIPPED_TOKENIZER)
    assert bare.chat_template is None and bare.files == [SHIPPED_TOKENIZER]
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (0, 1, 2)


def test_folder_errors(tmp_path) -> None:
    def error(path, *parts):
        one_line_error(lambda: Tokenizer(path), *parts)

    (tmp_path / "empty").mkdir()
    error(tmp_path / "empty", "model.tokenizer_path", "has no tokenizer.json")
    named = tokenizer_folder(tmp_path / "named", config={"chat_template": [{"name": "tool_use", "template": "x"}]})
    error(named, "tokenizer_config.json", "no 'default' template", "tool_use")
    unknown = tokenizer_folder(tmp_path / "unknown", config={"eos_token": "<eos>"})
    error(unknown, str(unknown), "'<eos>' is not in the vocabulary")
    broken = tokenizer_folder(tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{")
    error(broken, str(broken / "tokenizer_config.json"), "not JSON")
    odd = tokenizer_folder(tmp_path / "odd", config={"bos_token": 3})
    error(odd, "bos_token must be a string or an AddedToken")
