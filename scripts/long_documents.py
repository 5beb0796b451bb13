#!/usr/bin/env python
"""Write a .jsonl of long documents (field "text") cut from the shipped corpus, for packed
fine-tuning benchmarks with long documents (docs/performance.md, "Packed attention").

    python scripts/long_documents.py --out /tmp/long_docs.jsonl --min-chars 6000 --max-chars 48000

Consecutive paragraphs of assets/data/tinyshakespeare.txt are joined into documents whose
lengths are drawn uniformly from [--min-chars, --max-chars] (about 2.9 characters per token with
the shipped tokenizer), so packed windows hold a mix of long and medium documents.
"""

import argparse
import json
import random
import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "data" / "tinyshakespeare.txt"


def long_documents(text: str, min_chars: int, max_chars: int, seed: int) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    rng = random.Random(seed)
    documents, current, target = [], [], rng.randint(min_chars, max_chars)
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= target:
            documents.append("\n\n".join(current))
            current, target = [], rng.randint(min_chars, max_chars)
    if current:
        documents.append("\n\n".join(current))
    return documents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--min-chars", type=int, default=6000)
    p.add_argument("--max-chars", type=int, default=48000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    documents = long_documents(CORPUS.read_text(encoding="utf-8"), args.min_chars, args.max_chars, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")
    lengths = sorted(len(t) for t in documents)
    print(f"{args.out}: {len(documents)} documents, {lengths[0]}-{lengths[-1]} characters (median {lengths[len(lengths) // 2]})")


if __name__ == "__main__":
    main()
