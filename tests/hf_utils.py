"""Tiny random Hugging Face Llama checkpoints: the independent reference for HF loading tests."""

from pathlib import Path

import torch


def save_random_llama(folder: Path, *, vocab_size: int, hidden_size: int, intermediate_size: int,
                      num_attention_heads: int, rope_theta: float, tied: bool = False,
                      initializer_range: float = 0.02, **save_kwargs) -> torch.nn.Module:  # fmt: skip
    """Save a random fp32 GQA LlamaForCausalLM (2 layers, 2 KV heads) as safetensors; return it.

    The llama3 RoPE scaling starts at position 16, so sequences longer than that exercise it.
    """
    # Imported here, not at module level: spawned test workers import the test modules too.
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        initializer_range=initializer_range,
        tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at 1 would hide a swapped norm mapping
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model
