"""Write a large synthetic text corpus for data-pipeline measurements (docs/data.md).

    python scripts/synthetic_corpus.py OUT.jsonl --words 122000000 [--seed 0]

Documents are `{"text": ...}` records of words drawn with the word frequencies of the shipped
corpus, so the shipped tokenizer cuts them like real text (about 1.7 tokens a word); document
lengths follow a log-normal law (median about 200 words, a long tail past 8K tokens), which gives
packing uneven documents and some longer than seq_len. Keep the output outside the repository.
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "assets/data/tinyshakespeare.txt"
WORDS_PER_CHUNK = 2_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--words", type=int, default=122_000_000, help="words to write in all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = Counter(re.findall(r"[A-Za-z']+|[.,;:!?]", SOURCE.read_text()))
    vocabulary = np.array(list(counts))
    weights = np.array(list(counts.values()), dtype=np.float64)
    weights /= weights.sum()
    rng = np.random.default_rng(args.seed)
    written = 0
    with open(args.output, "w") as out:
        while written < args.words:
            words = vocabulary[rng.choice(len(vocabulary), size=WORDS_PER_CHUNK, p=weights)]
            lengths = np.maximum(2, rng.lognormal(np.log(200), 1.0, size=WORDS_PER_CHUNK // 100).astype(np.int64))
            cuts = np.cumsum(lengths)
            cuts = cuts[cuts < WORDS_PER_CHUNK]
            out.writelines(json.dumps({"text": " ".join(doc)}) + "\n" for doc in np.split(words, cuts))
            written += WORDS_PER_CHUNK
    print(f"{args.output}: {written:,} words, {args.output.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
