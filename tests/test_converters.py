"""model.converters: which linears Float8 takes (float8.filter_fqns), and the one-line errors
where it cannot run."""

import sys

import pytest
import torch
from torch import nn

from titan_cp.config import load_config
from titan_cp.config.schema import Float8
from titan_cp.converters import _import_torchao_float8, apply_converters, float8_filter
from titan_cp.errors import UserError
from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import Transformer


def _float8_linears(filter_fqns: list[str]) -> tuple[set[str], set[str]]:
    """(the linears Float8 takes under `filter_fqns`, all linears) of the debug model."""
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    chosen = {name for name, module in model.named_modules() if float8_filter(module, name, filter_fqns)}
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return chosen, linears


def test_float8_takes_every_linear_by_default():
    chosen, linears = _float8_linears(Float8().filter_fqns)
    assert chosen == linears  # the output projection too
    assert "layers.0.attention.wq" in chosen and "layers.1.feed_forward.w2" in chosen


def test_float8_filter_fqns_choose_what_stays_bf16():
    chosen, linears = _float8_linears(["output"])
    assert chosen == linears - {"output"}
    chosen, linears = _float8_linears(["output", "attention.wk", "attention.wv"])
    assert chosen == {name for name in linears if name != "output" and not name.endswith(("wk", "wv"))}
    assert load_config(["--float8.filter_fqns", "output,w2"]).float8.filter_fqns == ["output", "w2"]
    assert load_config(["--float8.filter_fqns="]).float8.filter_fqns == []


def test_float8_skips_sizes_float8_matmuls_cannot_take():
    assert not float8_filter(nn.Linear(64, 100, device="meta"), "layers.0.feed_forward.w1", [])
    assert not float8_filter(nn.Linear(24, 64, device="meta"), "layers.0.feed_forward.w1", [])
    assert not float8_filter(nn.LayerNorm(64, device="meta"), "layers.0.norm", [])


def test_float8_on_cpu_is_one_clear_line():
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    with pytest.raises(UserError) as info:
        apply_converters(model, ["float8"], torch.device("cpu"), Float8())
    message = str(info.value)
    assert "\n" not in message and "model.converters = float8" in message and "the CPU" in message


def test_float8_filter_naming_no_layer_is_one_clear_line():
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    with pytest.raises(UserError) as info:
        apply_converters(model, ["float8"], torch.device("cpu"), Float8(filter_fqns=["output", "outptu"]))
    message = str(info.value)
    assert "\n" not in message and message.startswith("float8.filter_fqns: outptu names no linear layer")


def test_float8_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UserError) as info:
        _import_torchao_float8()
    assert "pip install -e '.[float8]'" in str(info.value) and "\n" not in str(info.value)


def test_no_converters_leave_the_model_alone():
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    before = [type(m) for m in model.modules()]
    apply_converters(model, [], torch.device("cpu"), Float8())
    assert [type(m) for m in model.modules()] == before
