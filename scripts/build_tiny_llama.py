"""Write the tiny Hugging Face Llama folder shipped in assets/tiny_llama/ (random weights).

The README's fine-tuning example starts from it, so it runs on a laptop CPU with no download.
It is written by transformers itself, as a downloaded checkpoint would be, and it exercises
what real checkpoints have and the built-in flavors do not: an explicit `head_dim` that is not
hidden_size / num_attention_heads, tied embeddings, llama3 RoPE scaling, bf16 weights and a
tokenizer folder with a chat template (transformers 5 writes it as chat_template.jinja).
The tokenizer is the shipped assets/tokenizer/tokenizer.json. Needs transformers
(`pip install -e .[test]`); running it again gives the same weights.

    python scripts/build_tiny_llama.py [--output assets/tiny_llama]
"""

import argparse
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "assets" / "tokenizer" / "tokenizer.json"
# Plain-text role headers, since the shipped tokenizer has no chat special tokens; each turn
# ends with the EOS token, which is therefore also what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)


def build(output: Path) -> None:
    # Imported here so `--help` works without transformers.
    import torch
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # not 32 / 4: the attention projections are 64 wide
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    # Written aside and moved into place, so a failed build leaves the shipped folder intact
    # (and its README.md, which transformers does not write, stays).
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        staging = Path(tmp)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        output.mkdir(exist_ok=True)
        for file in staging.iterdir():
            os.replace(file, output / file.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO / "assets" / "tiny_llama")
    build(parser.parse_args().output.absolute())


if __name__ == "__main__":
    main()
