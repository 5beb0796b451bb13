"""titan_cp <-> Hugging Face Llama state-dict names.

Only names change. titan_cp's RoPE uses Hugging Face's rotate_half layout (pairs i, i + D/2),
so q/k projection rows need no permutation in either direction (docs/model.md explains why).
"""

import re

import torch

from titan_cp.errors import UserError
from titan_cp.models.llama3.args import TransformerModelArgs

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_LEVEL_FROM_HF = {hf: titan for titan, hf in _TOP_LEVEL.items()}
_PER_LAYER_FROM_HF = {hf: titan for titan, hf in _PER_LAYER.items()}
_TITAN_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


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


def from_hf_name(name: str) -> str | None:
    """The titan_cp name of a Hugging Face Llama tensor, or None when it has none."""
    if name in _TOP_LEVEL_FROM_HF:
        return _TOP_LEVEL_FROM_HF[name]
    match = _HF_LAYER.fullmatch(name)
    if match and match.group(2) in _PER_LAYER_FROM_HF:
        return f"layers.{match.group(1)}.{_PER_LAYER_FROM_HF[match.group(2)]}"
    return None


def expected_hf_names(args: TransformerModelArgs) -> list[str]:
    """Every tensor a Hugging Face checkpoint of these args holds (no lm_head when tied)."""
    names = ["model.embed_tokens.weight"]
    for i in range(args.n_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in _PER_LAYER.values()]
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


def from_hf(state_dict: dict[str, torch.Tensor], args: TransformerModelArgs) -> dict[str, torch.Tensor]:
    """Hugging Face LlamaForCausalLM state dict -> titan_cp state dict (tied output filled in)."""
    converted = {}
    for name, tensor in state_dict.items():
        if is_ignored_hf_name(name, args):
            continue
        titan_name = from_hf_name(name)
        if titan_name is None:
            raise UserError(f"unexpected tensor {name!r}: not part of a Llama model")
        converted[titan_name] = tensor
    if args.tie_word_embeddings and "tok_embeddings.weight" in converted:
        converted["output.weight"] = converted["tok_embeddings.weight"]
    return converted
