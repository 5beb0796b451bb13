"""What an exported Hugging Face folder needs besides weights so transformers can serve it.

`AutoModelForCausalLM.from_pretrained(folder)` plus `AutoTokenizer.from_pretrained(folder)`
must work with nothing else: the run's tokenizer files, the special-token ids in config.json,
and a generation_config.json whose ids let `generate` stop and pad.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titan_cp.data import Tokenizer
from titan_cp.data.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from titan_cp.data.tokenizer import TEMPLATE_FILE as CHAT_TEMPLATE_FILE
from titan_cp.data.tokenizer import TOKENIZER_FILE
from titan_cp.errors import UserError

SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Every file name an export writes besides config.json and the weights.
SERVING_FILE_NAMES = {
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    GENERATION_CONFIG_FILE,
}


@dataclass
class ServingFiles:
    """The tokenizer files to copy (by their export name) and the special-token ids to write."""

    copies: dict[str, Path]
    token_ids: dict[str, int | None]
    # Written as tokenizer_config.json when the tokenizer came without one (a bare tokenizer.json).
    tokenizer_config: dict[str, Any] | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        for name, source in self.copies.items():
            shutil.copyfile(source, folder / name)
        if self.tokenizer_config is not None:
            _write_json(folder / TOKENIZER_CONFIG_FILE, self.tokenizer_config)
        _write_json(folder / GENERATION_CONFIG_FILE, self.generation_config)


def serving_files(tokenizer: Tokenizer, model_folder: str | Path | None = None) -> ServingFiles:
    """The serving files of a run with `tokenizer`, started from the HF `model_folder` (if any).

    A generation_config.json in `model_folder` is kept (its sampling defaults and stop ids
    belong to the model); ids it lacks come from the tokenizer.
    """
    token_ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    # A folder's files (tokenizer.json, tokenizer_config.json, chat_template.jinja) keep their
    # names; a bare tokenizer file, whatever its name, becomes tokenizer.json.
    copies = {TOKENIZER_FILE if path == tokenizer.files[0] else path.name: path for path in tokenizer.files}
    special_map = tokenizer.path / SPECIAL_TOKENS_MAP_FILE
    if tokenizer.path.is_dir() and special_map.is_file():
        copies[SPECIAL_TOKENS_MAP_FILE] = special_map
    tokenizer_config = None
    if TOKENIZER_CONFIG_FILE not in copies:
        # The class transformers uses for any tokenizer.json; named so that config.json's
        # model_type does not pick a Llama-specific class that would rewrite the tokenizer.
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name in ("bos_token", "eos_token", "pad_token"):
            tokenizer_config[name] = getattr(tokenizer, name)
    return ServingFiles(copies, token_ids, tokenizer_config, _generation_config(model_folder, token_ids))


def _generation_config(model_folder: str | Path | None, token_ids: dict[str, int | None]) -> dict[str, Any]:
    generation_config: dict[str, Any] = {}
    source = Path(model_folder) / GENERATION_CONFIG_FILE if model_folder is not None else None
    if source is not None and source.is_file():
        try:
            generation_config = json.loads(source.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{source}: unreadable JSON ({e})") from None
        if not isinstance(generation_config, dict):
            raise UserError(f"{source}: expected a JSON object")
    for key, value in token_ids.items():
        if generation_config.get(key) is None:
            generation_config[key] = value
    return generation_config


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
