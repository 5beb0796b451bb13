"""Train the small byte-level BPE tokenizer shipped in assets/tokenizer/.

The default run needs a tokenizer without downloading Llama 3's; this one is trained on the
shipped corpus, uses the Llama 3 special-token names (so `titan_cp.data.Tokenizer` treats both
alike) and is written deterministically: running the script again gives the same file.

    python scripts/build_tokenizer.py [--input FILE] [--output FILE] [--vocab-size N]
"""

import argparse
import json
import os
from pathlib import Path

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


def build(input_path: Path, vocab_size: int):
    # Imported here so `--help` works without the library.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is a symbol from the start, so no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(input_path)], trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=Path("assets/data/tinyshakespeare.txt"))
    parser.add_argument("--output", type=Path, default=Path("assets/tokenizer/tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()
    if not args.input.is_file():
        raise SystemExit(f"error: --input {args.input} is not a file")
    min_size = len(SPECIAL_TOKENS) + 256
    if args.vocab_size < min_size:
        raise SystemExit(f"error: --vocab-size {args.vocab_size} is below {min_size} (specials + 256 bytes)")
    # One thread: the word counts and merge order then do not depend on scheduling.
    os.environ["RAYON_NUM_THREADS"] = "1"
    tokenizer = build(args.input, args.vocab_size)
    # Re-serialise with sorted keys and a fixed indent so the file is stable byte for byte.
    text = json.dumps(json.loads(tokenizer.to_str()), indent=1, sort_keys=True, ensure_ascii=False)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {tokenizer.get_vocab_size()} tokens, {args.output.stat().st_size} bytes")


if __name__ == "__main__":
    main()
