"""Print the first records of a dataset as the trainer sees them, with the targets marked.

Each record is rendered and tokenized exactly as training does (docs/chat_data.md); the tokens
that are targets are printed between [[ and ]], so a glance shows whether the prompts are masked
and each answer ends with its end-of-turn token.

    python scripts/show_targets.py --data FILE_OR_FOLDER --tokenizer TOKENIZER [--records 3]
        [--format auto|text|chat|alpaca|prompt_completion] [--train-on-inputs auto|true|false]
"""

import argparse
import sys
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titan_cp.data.formats import FORMATS, Encoder  # noqa: E402
from titan_cp.data.records import iter_records  # noqa: E402
from titan_cp.data.tokenizer import Tokenizer  # noqa: E402
from titan_cp.errors import UserError  # noqa: E402

OPEN, CLOSE = "[[", "]]"


def marked(tokenizer: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    """The document's text with each run of targets between OPEN and CLOSE."""
    pieces, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            pieces.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = i
    return "".join(pieces)


def show(data: str, tokenizer_path: str, records: int, dataset_format: str, train_on_inputs: str) -> str:
    tokenizer = Tokenizer(tokenizer_path)
    encoder = Encoder(tokenizer, dataset_format, train_on_inputs)
    chosen = list(islice(iter_records(data), records))
    out = []
    for record, (ids, mask) in zip(chosen, encoder.encode_batch(chosen)):
        out.append(f"== {record.where} ({encoder.format}): {len(ids)} tokens, {sum(mask)} targets")
        out.append(marked(tokenizer, ids, mask))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset file or folder (training.dataset_path)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or Hugging Face folder")
    parser.add_argument("--records", type=int, default=3, help="how many records to show")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument("--train-on-inputs", default="auto", choices=("auto", "true", "false"))
    args = parser.parse_args()
    try:
        print(show(args.data, args.tokenizer, args.records, args.format, args.train_on_inputs))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
