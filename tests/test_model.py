import dataclasses

import pytest
import torch
import torch.nn.functional as F

from titan_cp.errors import UserError
from titan_cp.models.llama3 import Transformer, TransformerModelArgs, llama3_flavors, sdpa_causal_attention

TINY = TransformerModelArgs(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, ffn_dim_multiplier=None,
    rope_theta=10000.0, rope_scaling=None, max_seq_len=64,
)


def _model(args: TransformerModelArgs = TINY, **kwargs) -> Transformer:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args, **kwargs)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def _tokens(b=2, s=12):
    return torch.randint(0, TINY.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))


def test_logits_shape_and_loss_is_fp32_sum_of_token_losses():
    model, tokens = _model(), _tokens()
    logits = model(tokens)
    assert logits.shape == (2, 12, TINY.vocab_size)
    labels = tokens.roll(-1, 1)
    labels[:, -1] = -100
    loss = model(tokens, labels=labels, loss_chunk_size=5)
    expected = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), labels.reshape(-1), reduction="sum")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, expected)


def test_meta_init_fills_every_parameter_with_depth_scaled_outputs():
    model = _model(dataclasses.replace(TINY, n_layers=4))
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    assert torch.equal(model.norm.weight, torch.ones(TINY.dim))
    first, last = model.layers["0"].attention.wo.weight.std(), model.layers["3"].attention.wo.weight.std()
    assert last < first * 0.7  # std 0.02/sqrt(2) vs 0.02/sqrt(8)
    assert model.rope.inv_freq.device.type == "cpu" and torch.isfinite(model.rope.inv_freq).all()


def test_same_positions_reproduce_and_rope_is_relative():
    model, tokens = _model(), _tokens()
    with torch.no_grad():  # sharper attention than at init, so the scores depend visibly on position
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(20)
            layer.attention.wk.weight.mul_(20)
    base = torch.arange(12).expand(2, 12)
    out = model(tokens)
    torch.testing.assert_close(model(tokens, positions=base), out, rtol=0, atol=0)
    # RoPE sees only relative distances: shifting every position changes nothing...
    torch.testing.assert_close(model(tokens, positions=base + 1000), out, rtol=1e-4, atol=1e-4)
    # ...but positions that restart (a second packed document) do, from the restart on.
    restarted = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, 12)
    moved = model(tokens, positions=restarted)
    torch.testing.assert_close(moved[:, :6], out[:, :6])
    assert (moved[:, 6:] - out[:, 6:]).abs().max() > 1e-3


def test_attention_entry_point_gets_unrepeated_kv_and_the_context():
    seen = []

    def recording_attention(q, k, v, attention_context):
        seen.append((q.shape, k.shape, v.shape, attention_context))
        return sdpa_causal_attention(q, k, v, attention_context)

    model, tokens = _model(attention=recording_attention), _tokens()
    out = model(tokens, attention_context="ctx")
    head_dim = TINY.dim // TINY.n_heads
    assert seen == [((2, 12, 4, head_dim), (2, 12, 2, head_dim), (2, 12, 2, head_dim), "ctx")] * TINY.n_layers
    torch.testing.assert_close(out, _model()(tokens))


def test_sdpa_gqa_matches_attention_with_repeated_heads():
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    scores = torch.einsum("bshd,bthd->bhst", q, k.repeat_interleave(2, dim=2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(sdpa_causal_attention(q, k, v, None), expected)


def test_tied_embeddings_share_storage_after_meta_init():
    model = _model(dataclasses.replace(TINY, tie_word_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == model.args.num_params()
    assert model(_tokens()).abs().max() < 10  # a tied table initialised as an output projection


@pytest.mark.parametrize(
    "extra",
    [{}, {"tie_word_embeddings": True}, {"explicit_head_dim": 48, "attention_bias": True, "mlp_bias": True}],
    ids=["untied", "tied", "head_dim_and_biases"],
)
def test_num_params_counts_the_built_model(extra):
    args = dataclasses.replace(llama3_flavors["debugmodel"], **extra)
    tied = args.tie_word_embeddings
    with torch.device("meta"):
        model = Transformer(args)
    assert args.num_params() == sum(p.numel() for p in model.parameters())
    assert args.num_params(exclude_embedding=True) == args.num_params() - (0 if tied else args.vocab_size * args.dim)


def test_published_llama31_shapes():
    assert [llama3_flavors[f].ffn_hidden_dim for f in ("8B", "70B", "405B")] == [14336, 28672, 53248]
    assert llama3_flavors["8B"].num_params() == 8_030_261_248
    assert llama3_flavors["70B"].num_params() == 70_553_706_496
    for name in ("8B", "70B", "405B"):
        args = llama3_flavors[name]
        assert (args.vocab_size, args.rope_theta, args.head_dim, args.n_kv_heads) == (128256, 500000.0, 128, 8)
        assert args.rope_scaling.factor == 8 and args.rope_scaling.original_max_position_embeddings == 8192


def test_hf_config_round_trip_and_errors():
    args = llama3_flavors["8B"]
    back = TransformerModelArgs.from_hf_config(args.to_hf_config())
    assert back.ffn_hidden_dim == args.ffn_hidden_dim and back.rope_scaling == args.rope_scaling
    assert back.to_hf_config() == args.to_hf_config()
    with pytest.raises(UserError, match="field 'model_type' is 'mistral'"):
        TransformerModelArgs.from_hf_config({**args.to_hf_config(), "model_type": "mistral"})
    config = args.to_hf_config()
    del config["num_hidden_layers"]
    with pytest.raises(UserError, match="missing field 'num_hidden_layers'"):
        TransformerModelArgs.from_hf_config(config)


def test_rope_scaling_keeps_high_and_slows_low_frequencies():
    args = llama3_flavors["8B"]
    scaled = _inv_freq(args)
    plain = _inv_freq(dataclasses.replace(args, rope_scaling=None))
    assert torch.equal(scaled[:5], plain[:5])  # wavelengths below 8192/4 kept
    torch.testing.assert_close(scaled[-5:], plain[-5:] / 8)  # wavelengths above 8192 slowed 8x
    assert ((scaled <= plain) & (scaled >= plain / 8)).all()


def _inv_freq(args: TransformerModelArgs) -> torch.Tensor:
    from titan_cp.models.llama3.model import RotaryEmbedding

    rope = RotaryEmbedding(args)
    rope.reset("cpu")
    return rope.inv_freq
