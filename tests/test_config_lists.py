"""Config keys whose values are lists (model.converters) or true/false/auto (compile.enable)."""

import pytest

from titan_cp.config import load_config
from titan_cp.errors import UserError
from titan_cp.parallel.parallelize import compile_enabled

import torch


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def _error(argv: list[str]) -> str:
    with pytest.raises(UserError) as info:
        load_config(argv)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_converters_default_is_an_empty_list_per_config():
    first, second = load_config([]), load_config([])
    assert first.model.converters == [] and first.model.converters is not second.model.converters


def test_converters_from_toml_array(tmp_path):
    path = _toml(tmp_path, '[model]\nconverters = ["float8"]\n')
    assert load_config(["--job.config_file", path]).model.converters == ["float8"]
    path = _toml(tmp_path, "[model]\nconverters = []\n")
    assert load_config(["--job.config_file", path]).model.converters == []


@pytest.mark.parametrize(
    "argv,value",
    [
        (["--model.converters", "float8"], ["float8"]),
        (["--model.converters=float8"], ["float8"]),
        (["--model.converters", "float8, float8"], ["float8", "float8"]),
        (["--model.converters="], []),
    ],
)
def test_converters_from_cli(argv, value):
    assert load_config(argv).model.converters == value


def test_cli_list_overrides_toml_list(tmp_path):
    path = _toml(tmp_path, '[model]\nconverters = ["float8"]\n')
    assert load_config(["--job.config_file", path, "--model.converters="]).model.converters == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ('[model]\nconverters = "float8"\n', "model.converters in {}: expected a list"),
        ('[model]\nconverters = ["fp8"]\n', "model.converters in {}: expected one of float8, got 'fp8'"),
        ("[model]\nconverters = [8]\n", "model.converters in {}: expected one of float8, got 8"),
    ],
)
def test_bad_toml_lists_name_the_key_and_file(tmp_path, text, expected):
    path = _toml(tmp_path, text)
    assert expected.format(path) in _error(["--job.config_file", path])


def test_bad_cli_list_item_names_the_key():
    assert _error(["--model.converters", "float8,int4"]) == "--model.converters: expected one of float8, got 'int4'"


@pytest.mark.parametrize("text,value", [("auto", "auto"), ("AUTO", "auto"), ("true", True), ("false", False)])
def test_compile_enable_accepts_auto_and_booleans(text, value):
    assert load_config(["--compile.enable", text]).compile.enable == value


def test_compile_enable_from_toml(tmp_path):
    for text, value in (("true", True), ("false", False), ('"auto"', "auto")):
        path = _toml(tmp_path, f"[compile]\nenable = {text}\n")
        assert load_config(["--job.config_file", path]).compile.enable == value
    path = _toml(tmp_path, '[compile]\nenable = "yes"\n')
    assert "expected true, false or auto, got 'yes'" in _error(["--job.config_file", path])


def test_compile_auto_is_on_for_cuda_only():
    assert load_config([]).compile.enable == "auto"
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))
