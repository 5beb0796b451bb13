"""Tokenizer folders with chat templates, built from the shipped tokenizer.json, for the data tests.

The templates are written here in the styles of well-known model families: Llama 3 (system
message, header tokens, `trim`), ChatML (multi-turn, `{% generation %}` markers around the
assistant content), a ChatML one that drops an answer's reasoning (as reasoning models' templates
do), and a Mistral-style one that rejects a system role with raise_exception.
"""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from titan_cp.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = REPO / "assets/tokenizer/tokenizer.json"
TURN_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]

LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\n\n' }}\n"
    "{{- system_message }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {%- generation %}{{- message['content'] | trim }}{%- endgeneration %}\n"
    "    {%- else %}\n"
    "        {{- message['content'] | trim }}\n"
    "    {%- endif %}\n"
    "    {{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}\n"
    "{%- endif %}\n"
)

CHATML_STYLE = (
    "{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] }}"
    "{% if message.name is defined %} {{ message.name | tojson }}{% endif %}{{ '\n' }}"
    "{% if message['role'] == 'assistant' %}{% set ns.turns = ns.turns + 1 %}"
    "{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>' }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NO_SYSTEM_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

REASONING_STYLE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% set content = message['content'].split('</think>')[-1].lstrip() %}"
    "{% generation %}{{ content }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
)

SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}

CONVERSATIONS = [
    [
        {"role": "system", "content": "  You answer in verse.\n"},
        {"role": "user", "content": "Who speaks first?"},
        {"role": "assistant", "content": "First Citizen:\nBefore we proceed any further, hear me speak. "},
    ],
    [
        {"role": "user", "content": "Say 'hello' twice"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Ünïcödé <&> and \"quotes\"", "name": "Ünï <&>"},
        {"role": "assistant", "content": "hello hello"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "  Fare thee well.  "},
    ],
    [
        {"role": "user", "content": "Who is Cominius?"},
        {"role": "assistant", "content": "<think>A general in Coriolanus.</think>\n\nA Roman general."},
    ],
]


def tokenizer_folder(
    folder: Path, template: str | None = None, template_file: bool = False, config: dict | None = None
) -> Path:
    """A Hugging Face tokenizer folder: the shipped tokenizer.json plus the turn tokens as specials.

    The template goes into tokenizer_config.json, or into chat_template.jinja (transformers 5's
    form) with `template_file`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer.from_file(str(SHIPPED_TOKENIZER))
    tok.add_special_tokens(TURN_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    config = {**SPECIALS, **(config or {})}
    if template is not None:
        if template_file:
            (folder / "chat_template.jinja").write_text(template)
        else:
            config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def one_line_error(fn, *parts: str) -> str:
    """The UserError `fn` raises: one line, holding every part."""
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message
