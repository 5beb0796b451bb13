"""titan_cp <-> Hugging Face Llama state-dict names.

Only names change. titan_cp's RoPE uses Hugging Face's rotate_half layout (pairs i, i + D/2),
so q/k projection rows need no permutation in either direction (docs/model.md explains why).
"""

import re

import torch

from titan_cp.models.llama3.args import TransformerModelArgs

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ATTENTION = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
}
_MLP = {
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_NORMS = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Biases (attention_bias / mlp_bias) map like their weights.
_PER_LAYER = {
    **{f"{titan}.{kind}": f"{hf}.{kind}" for titan, hf in {**_ATTENTION, **_MLP}.items() for kind in ("weight", "bias")},
    **_NORMS,
}
_TITAN_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


# Module wrappers that insert a level into parameter names: activation checkpointing, torch.compile.
_WRAPPER_LEVEL = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def to_hf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight` (wrappers ignored)."""
    name = _WRAPPER_LEVEL.sub("", name)
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _TITAN_LAYER.fullmatch(name)
    if match and match.group(2) in _PER_LAYER:
        return f"model.layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}"
    raise KeyError(f"no Hugging Face name for titan_cp tensor {name!r}")


def expected_hf_names(args: TransformerModelArgs) -> list[str]:
    """Every tensor a Hugging Face checkpoint of these args holds (no lm_head when tied)."""
    per_layer = [f"{hf}.weight" for hf in {**_ATTENTION, **_MLP}.values()] + list(_NORMS.values())
    per_layer += [f"{hf}.bias" for hf in _ATTENTION.values()] if args.attention_bias else []
    per_layer += [f"{hf}.bias" for hf in _MLP.values()] if args.mlp_bias else []
    names = ["model.embed_tokens.weight"]
    for i in range(args.n_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in per_layer]
    names.append("model.norm.weight")
    if not args.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def is_ignored_hf_name(name: str, args: TransformerModelArgs) -> bool:
    """Tensors Hugging Face itself ignores: old per-layer RoPE caches, and lm_head when tied."""
    return name.endswith("rotary_emb.inv_freq") or (args.tie_word_embeddings and name == "lm_head.weight")


def to_hf(state_dict: dict[str, torch.Tensor], args: TransformerModelArgs) -> dict[str, torch.Tensor]:
    """titan_cp state dict -> Hugging Face LlamaForCausalLM state dict."""
    return {
        to_hf_name(name): tensor
        for name, tensor in state_dict.items()
        if not (args.tie_word_embeddings and to_hf_name(name) == "lm_head.weight")
    }
