"""Tiny random Hugging Face Llama checkpoints: the independent reference for HF loading tests."""

import json
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# A template in transformers' Jinja dialect that the shipped 2048-token tokenizer can spell.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)


def save_random_llama(folder: Path, *, vocab_size: int, hidden_size: int, intermediate_size: int,
                      num_attention_heads: int, rope_theta: float, tied: bool = False,
                      initializer_range: float = 0.02, rope_scaling: dict | None = LLAMA3_ROPE,
                      head_dim: int | None = None, attention_bias: bool = False, mlp_bias: bool = False,
                      **save_kwargs) -> torch.nn.Module:  # fmt: skip
    """Save a random fp32 GQA LlamaForCausalLM (2 layers, 2 KV heads) as safetensors; return it.

    The default llama3 RoPE scaling starts at position 16, so sequences longer than that
    exercise it. Biases are random (not zero), so a bias that is not loaded changes the logits.
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
        head_dim=head_dim,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        initializer_range=initializer_range,
        tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at 1 would hide a swapped norm mapping; zero biases a dropped one
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.2, 0.2)
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model


def save_tokenizer_files(folder: Path) -> None:
    """The shipped tokenizer as a Hugging Face tokenizer folder with a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "assets" / "tokenizer" / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
