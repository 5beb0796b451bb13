"""Helpers shared by the tests of one-line user errors and of TOML config files."""

from pathlib import Path

import pytest

from titan_cp.config import load_config
from titan_cp.errors import UserError


def one_line_error(fn, *parts: str) -> str:
    """The UserError `fn` raises: one line, holding every part."""
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def config_error(argv: list[str], *parts: str) -> str:
    """The one-line UserError that loading the config from `argv` raises."""
    return one_line_error(lambda: load_config(argv), *parts)


def write_toml(tmp_path: Path, text: str) -> str:
    """Writes `text` to run.toml in `tmp_path` and returns its path."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)
