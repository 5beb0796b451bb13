"""Llama 3: model arguments and flavors, the model, and the Hugging Face state-dict mapping."""

from titan_cp.models.llama3.args import RopeScaling, TransformerModelArgs, llama3_flavors
from titan_cp.models.llama3.model import Transformer, sdpa_causal_attention

__all__ = ["RopeScaling", "Transformer", "TransformerModelArgs", "llama3_flavors", "sdpa_causal_attention"]
