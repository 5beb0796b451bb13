"""model.converters: which linears Float8 takes, and the one-line errors where it cannot run."""

import sys

import pytest
import torch
from torch import nn

from titan_cp.converters import _import_torchao_float8, apply_converters, float8_filter
from titan_cp.errors import UserError
from titan_cp.models.llama3.args import llama3_flavors
from titan_cp.models.llama3.model import Transformer


def test_float8_takes_block_linears_only():
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    chosen = {name for name, module in model.named_modules() if float8_filter(module, name)}
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert chosen == linears - {"output"}
    assert "layers.0.attention.wq" in chosen and "layers.1.feed_forward.w2" in chosen


def test_float8_skips_sizes_float8_matmuls_cannot_take():
    assert not float8_filter(nn.Linear(64, 100, device="meta"), "layers.0.feed_forward.w1")
    assert not float8_filter(nn.Linear(24, 64, device="meta"), "layers.0.feed_forward.w1")
    assert not float8_filter(nn.LayerNorm(64, device="meta"), "layers.0.norm")


def test_float8_on_cpu_is_one_clear_line():
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    with pytest.raises(UserError) as info:
        apply_converters(model, ["float8"], torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message and "model.converters = float8" in message and "the CPU" in message


def test_float8_without_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(UserError) as info:
        _import_torchao_float8()
    assert "pip install 'titan_cp[float8]'" in str(info.value) and "\n" not in str(info.value)


def test_no_converters_leave_the_model_alone():
    with torch.device("meta"):
        model = Transformer(llama3_flavors["debugmodel"])
    before = [type(m) for m in model.modules()]
    apply_converters(model, [], torch.device("cpu"))
    assert [type(m) for m in model.modules()] == before
