"""A Hugging Face tokenizer read from a `tokenizer.json` file or a Hugging Face model folder.

- A file: the `tokenizer.json` alone. BOS is `<|begin_of_text|>` (else `<s>`), EOS
  `<|end_of_text|>` (else `</s>`), padding `<|pad|>` (else `<pad>`, else EOS); no chat template.
- A folder (as `save_pretrained` writes it): `tokenizer.json`, plus `tokenizer_config.json` when
  present, for the named special tokens (`bos_token`, `eos_token`, `pad_token`, ...: a string or
  an AddedToken dict), `add_bos_token` / `add_eos_token` and the chat template. A
  `chat_template.jinja` file wins over the config's `chat_template`, as in transformers 5; the
  config's list-of-named-templates form gives its "default" template. A token the config sets to
  null is absent (Qwen-style folders have no BOS); a token it does not name falls back to the
  names above.

`encode` never adds special tokens: the data pipeline adds BOS/EOS itself (or the chat template
writes them), so a real Llama 3 `tokenizer.json`, whose post-processor would prepend BOS,
behaves like the shipped one.
"""

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from titan_cp.errors import UserError

BOS_NAMES = ("<|begin_of_text|>", "<s>")
EOS_NAMES = ("<|end_of_text|>", "</s>")
PAD_NAMES = ("<|pad|>", "<pad>")
# The standard named special tokens (transformers' SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """Text <-> token ids, the special tokens, the chat template and the files they came from."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            tokenizer_file = self.path / TOKENIZER_FILE
            if not tokenizer_file.is_file():
                raise UserError(f"model.tokenizer_path: folder {self.path} has no {TOKENIZER_FILE}")
        elif self.path.is_file():
            tokenizer_file = self.path
        else:
            raise UserError(f"model.tokenizer_path: tokenizer file {self.path} does not exist")
        self._tok = _load_tokenizer_json(tokenizer_file)
        # Every file read, the tokenizer.json first (whatever its name); an export copies them.
        self.files: list[Path] = [tokenizer_file]
        config = self._read_config() if self.path.is_dir() else {}
        self.chat_template: str | None = None
        self.chat_template_source: Path | None = None  # the file the template was read from
        if self.path.is_dir():
            self.chat_template, self.chat_template_source = self._read_chat_template(config)
            if self.chat_template_source is not None and self.chat_template_source not in self.files:
                self.files.append(self.chat_template_source)

        # The named tokens the config sets, as transformers passes them to a chat template: the
        # standard names, then any other `*_token` key holding a token (e.g. `image_token`).
        self.special_tokens: dict[str, str] = {
            name: self._token_content(config[name], name)
            for name in TEMPLATE_TOKEN_NAMES
            if config.get(name) is not None
        }
        for name, value in config.items():
            if name.endswith("_token") and name not in self.special_tokens and _is_token(value):
                self.special_tokens[name] = self._token_content(value, name)
        self.bos_token: str | None = self._named("bos_token", BOS_NAMES, config)
        if self.bos_token is None and "bos_token" not in config:
            raise UserError(
                f"model.tokenizer_path: {tokenizer_file} has no BOS token (looked for {' or '.join(BOS_NAMES)})"
            )
        eos_token = self._named("eos_token", EOS_NAMES, config)
        if eos_token is None:
            raise UserError(
                f"model.tokenizer_path: {self.path} has no EOS token (set eos_token in {CONFIG_FILE}"
                f" or add {' or '.join(EOS_NAMES)} to the vocabulary)"
            )
        self.eos_token: str = eos_token
        # Padding is never a target (its labels are -100), so EOS is a safe stand-in.
        self.pad_token: str = self._named("pad_token", PAD_NAMES, config) or self.eos_token
        self.bos_id: int | None = None if self.bos_token is None else self._id_of(self.bos_token)
        self.eos_id: int = self._id_of(self.eos_token)
        self.pad_id: int = self._id_of(self.pad_token)
        # The config's wish for `tokenizer(text)`, kept for exports; titan_cp's plain documents
        # always get BOS (where there is one) and EOS, which ends a document (docs/chat_data.md).
        self.add_bos_token: bool = bool(config.get("add_bos_token", self.bos_id is not None))
        self.add_eos_token: bool = bool(config.get("add_eos_token", False))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    def _read_config(self) -> dict:
        file = self.path / CONFIG_FILE
        if not file.is_file():
            return {}
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"model.tokenizer_path: {file} is not JSON ({e})") from None
        if not isinstance(config, dict):
            raise UserError(f"model.tokenizer_path: {file} is not a JSON object")
        self.files.append(file)
        return config

    def _read_chat_template(self, config: dict) -> tuple[str | None, Path | None]:
        """The folder's template and its file: chat_template.jinja, else the config's `chat_template`."""
        file = self.path / TEMPLATE_FILE
        if file.is_file():
            return file.read_text(encoding="utf-8"), file
        template = config.get("chat_template")
        config_file = self.path / CONFIG_FILE
        if template is None:
            return None, None
        if isinstance(template, str):
            return template, config_file
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"], config_file
            raise UserError(
                f"model.tokenizer_path: {config_file} chat_template has no 'default' template"
                f" (named: {', '.join(map(str, named))})"
            )
        raise UserError(
            f"model.tokenizer_path: {config_file} chat_template must be a string or a list of"
            f" {{name, template}}, got {type(template).__name__}"
        )

    def _named(self, name: str, fallbacks: tuple[str, ...], config: dict) -> str | None:
        """The config's token (None where it says null), else the first fallback in the vocabulary."""
        if name in config:
            return self.special_tokens.get(name)
        return next((n for n in fallbacks if self._tok.token_to_id(n) is not None), None)

    def _token_content(self, value, name: str) -> str:
        content = value.get("content") if isinstance(value, dict) else value
        if not isinstance(content, str):
            raise UserError(
                f"model.tokenizer_path: {self.path / CONFIG_FILE} {name} must be a string or an"
                f" AddedToken object with 'content', got {value!r}"
            )
        return content

    def _id_of(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise UserError(f"model.tokenizer_path: {self.path}: special token {token!r} is not in the vocabulary")
        return token_id

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file the tokenizer was read from, by file name."""
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in self.files}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel inside the tokenizers library)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """`encode_batch` plus each token's (start, end) character span in its text."""
        return [(e.ids, e.offsets) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _is_token(value) -> bool:
    return isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)


def _load_tokenizer_json(file: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model.tokenizer_path: {file} is not a Hugging Face tokenizer.json ({reason})") from None
