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
    # Some Hugging Face configs give `head_dim` explicitly, not equal to dim / n_heads; None derives it.
    explicit_head_dim: int | None = None
    # Biases on the q/k/v/o projections and on the three MLP projections (HF `attention_bias`, `mlp_bias`).
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim if self.explicit_head_dim is not None else self.dim // self.n_heads

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
        if self.attention_bias:
            attention += q_out + 2 * kv_out + self.dim
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        if self.mlp_bias:
            feed_forward += 2 * self.ffn_hidden_dim + self.dim
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
        """Args from a Hugging Face LlamaForCausalLM config.json (transformers v4 or v5 spelling).

        Accepts what transformers' own Llama runs with titan_cp's math; anything else raises
        one line naming the field.
        """
        model_type = config.get("model_type")
        if model_type != "llama":
            raise UserError(f"{source}: field 'model_type' is {model_type!r}; titan_cp trains only 'llama' models")
        architectures = config.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in architectures:
            raise UserError(f"{source}: field 'architectures' is {architectures}; expected ['LlamaForCausalLM']")

        def required(key: str) -> Any:
            if config.get(key) is None:
                raise UserError(f"{source}: missing field {key!r} needed for a Llama model")
            return config[key]

        if config.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: field 'hidden_act' is {config['hidden_act']!r}; titan_cp's Llama supports only 'silu'")
        # titan_cp has no dropout; a non-zero attention_dropout would train a different model.
        if float(config.get("attention_dropout") or 0.0) != 0.0:
            raise UserError(f"{source}: field 'attention_dropout' is {config['attention_dropout']!r}; titan_cp supports only 0")

        # transformers v5 folds rope_theta and rope_scaling into rope_parameters.
        rope_field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
        rope = dict(config.get(rope_field) or {})
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise UserError(f"{source}: field {rope_field!r} of rope type 'llama3' lacks {e.args[0]!r}") from None
        elif rope_type == "default":
            scaling = None
        else:
            raise UserError(
                f"{source}: field {rope_field!r} has rope type {rope_type!r}; titan_cp supports 'llama3' or none"
            )

        n_heads = int(required("num_attention_heads"))
        dim = int(required("hidden_size"))
        head_dim = config.get("head_dim")
        return cls(
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
            # Kept only when it differs, so args compare equal whichever way a config spells it.
            explicit_head_dim=None if head_dim is None or int(head_dim) == dim // n_heads else int(head_dim),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def to_hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A config.json for LlamaForCausalLM, in the spelling Meta's published checkpoints use."""
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
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
