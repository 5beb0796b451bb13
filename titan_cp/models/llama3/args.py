"""Llama 3 shapes: the model arguments, the named flavors, and the Hugging Face config mapping."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from titan_cp.errors import UserError


@dataclass
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling: long wavelengths slowed by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class TransformerModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    # An explicit FFN width, as Hugging Face configs give it; None derives it from the two above.
    intermediate_size: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4·dim (same parameters as a 4·dim GELU MLP), scaled, rounded up."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count from the shapes alone (no model needed, so it works for 405B on a laptop).

        `exclude_embedding=True` drops the token embedding table, which is a lookup and costs no
        FLOPs; the output projection is always counted (it is a matmul even when tied).
        """
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = self.dim * q_out + 2 * self.dim * kv_out + q_out * self.dim
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attention + feed_forward + 2 * self.dim
        embedding = self.vocab_size * self.dim
        output = self.vocab_size * self.dim
        body = self.n_layers * per_layer + self.dim + output
        if exclude_embedding:
            return body
        return body + (0 if self.tie_word_embeddings else embedding)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "TransformerModelArgs":
        """Args from `dataclasses.asdict` output, e.g. the `model_args` a checkpoint's meta.json holds."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise UserError(f"{source}: unknown model argument {key!r}; valid: {', '.join(sorted(names))}")
        values = dict(values)
        if values.get("rope_scaling") is not None:
            try:
                values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
            except TypeError as e:
                raise UserError(f"{source}: model argument 'rope_scaling' is not valid ({e})") from None
        return cls(**values)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "TransformerModelArgs":
        """Args from a Hugging Face Llama config.json (transformers v4 or v5 spelling)."""
        model_type = config.get("model_type")
        architectures = config.get("architectures") or ["LlamaForCausalLM"]
        if model_type != "llama" or "LlamaForCausalLM" not in architectures:
            raise UserError(
                f"{source}: model_type {model_type!r} / architectures {architectures} is not a Llama;"
                " expected model_type 'llama' and LlamaForCausalLM"
            )

        def required(key: str) -> Any:
            if key not in config:
                raise UserError(f"{source}: missing field {key!r} needed for a Llama model")
            return config[key]

        for key, valid in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if config.get(key, valid) != valid:
                raise UserError(f"{source}: field {key!r} is {config[key]!r}; titan_cp's Llama supports only {valid!r}")

        # transformers v5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "default":
            scaling = None
        else:
            raise UserError(f"{source}: rope type {rope_type!r} is not supported; expected 'llama3' or none")

        n_heads = int(required("num_attention_heads"))
        dim = int(required("hidden_size"))
        args = cls(
            dim=dim,
            n_layers=int(required("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            vocab_size=int(required("vocab_size")),
            intermediate_size=int(required("intermediate_size")),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim != args.head_dim:
            raise UserError(
                f"{source}: field 'head_dim' is {head_dim}; titan_cp needs hidden_size / num_attention_heads"
                f" = {args.head_dim}"
            )
        return args

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A config.json for LlamaForCausalLM, in the spelling Meta's published checkpoints use."""
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
        }
        if self.rope_scaling is not None:
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_scaling.factor,
                "low_freq_factor": self.rope_scaling.low_freq_factor,
                "high_freq_factor": self.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
            }
        return config


llama3_flavors: dict[str, TransformerModelArgs] = {
    # Small enough to train a few steps a second on a 2-core CPU.
    "debugmodel": TransformerModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=2048,
        multiple_of=256,
        ffn_dim_multiplier=None,
        rope_theta=500000.0,
        rope_scaling=None,
        max_seq_len=8192,
    ),
    # Llama 3.2 1B: a 1B-class model for quick GPU runs (tied embeddings, rope factor 32).
    "1B": TransformerModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        rope_scaling=RopeScaling(factor=32.0),
        tie_word_embeddings=True,
    ),
    # Llama 3.1 shapes as published by Meta.
    "8B": TransformerModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3
    ),
    "70B": TransformerModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    ),
    "405B": TransformerModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2
    ),
}
