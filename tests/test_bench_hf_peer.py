"""scripts/bench_hf_peer.py builds the same model as titan_cp's flavor and trains it."""

import math
import sys

import pytest
import torch

from tests.script_utils import load_script
from titan_cp.memory import count_params
from titan_cp.models.llama3.args import llama3_flavors


def test_peer_is_the_same_model_and_trains(tmp_path):
    out = tmp_path / "hf.json"
    result = load_script("bench_hf_peer").main(["--flavor", "debugmodel", "--seq-len", "32", "--steps", "2", "--warmup", "1",
                                 "--device", "cpu", "--out", str(out)])  # fmt: skip
    args = llama3_flavors["debugmodel"]
    assert result["params"] == count_params(args).total
    assert result["tokens_per_s"] > 0 and result["step_ms"] > 0
    # Random init on uniform tokens: the first loss is close to ln(vocab).
    assert abs(result["losses"][0] - math.log(args.vocab_size)) < 0.5
    assert out.exists()


def test_peer_keeps_titan_cp_shapes():
    model, _ = load_script("bench_hf_peer").build_peer("debugmodel", torch.device("cpu"))
    args = llama3_flavors["debugmodel"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        args.dim, args.n_layers, args.n_heads, args.n_kv_heads
    )
    assert config.intermediate_size == args.ffn_hidden_dim and config._attn_implementation == "sdpa"


def test_fused_loss_path_gives_hf_loss():
    """The --liger path (hidden states + output weight into a fused loss) computes HF's own loss;
    a plain linear + cross-entropy stands in for Liger's kernel, which needs CUDA."""
    script = load_script("bench_hf_peer")
    model, _ = script.build_peer("debugmodel", torch.device("cpu"))
    tokens = torch.randint(model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def linear_cross_entropy(weight, hidden, targets):
        return torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)

    expected = script.causal_lm_loss(model, tokens)
    torch.testing.assert_close(script.causal_lm_loss(model, tokens, linear_cross_entropy), expected)


def test_liger_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(SystemExit) as info:
        load_script("bench_hf_peer").liger_loss()
    assert "pip install liger-kernel" in str(info.value)
