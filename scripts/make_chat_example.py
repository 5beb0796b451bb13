"""Write the small chat dataset shipped in assets/data/chat_example.jsonl.

Conversations about the shipped Shakespeare corpus, so a chat fine-tune runs with no download:
the user asks for a line by a speaker, or who speaks a line, or what comes next; the assistant
answers from the corpus. Some conversations open with a system message, some have several
turns. The output is deterministic: running the script again gives the same file.

    python scripts/make_chat_example.py [--corpus FILE] [--output FILE] [--conversations N]
"""

import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PROMPTS = [
    "You answer with lines from Shakespeare's plays.",
    "You are a patient guide to the plays. Keep answers to one line.",
    "Answer briefly.",
]
MAX_LINE_CHARS = 90
SMALL_WORDS = {"of", "the", "and", "to"}
CHORUS = {"ALL", "BOTH"}  # headings that name no single speaker


def speaker_name(heading: str) -> str:
    """'KING EDWARD IV' -> 'King Edward IV', 'DUKE OF YORK' -> 'Duke of York'."""
    words = []
    for n, word in enumerate(heading.split()):
        if re.fullmatch(r"[IVX]+", word):
            words.append(word)
        elif n and word.lower() in SMALL_WORDS:
            words.append(word.lower())
        else:
            words.append(word.capitalize())
    return " ".join(words)


def speeches(corpus: Path) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech: blocks between blank lines whose first line is 'NAME:'.

    Lines longer than MAX_LINE_CHARS are left out, to keep the conversations short.
    """
    out = []
    for block in corpus.read_text(encoding="utf-8").split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":") and lines[0][:-1].upper() not in CHORUS:
            body = [line for line in lines[1:] if len(line) <= MAX_LINE_CHARS]
            if body:
                out.append((speaker_name(lines[0][:-1]), body))
    return out


def conversation(rng: random.Random, pool: list[tuple[str, list[str]]]) -> dict:
    speaker, lines = rng.choice(pool)
    start = rng.randrange(len(lines))
    kind = rng.choice(["line_by", "who_says", "what_next", "what_next"])  # what_next twice: more multi-turn
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if kind == "who_says":
        messages += [
            {"role": "user", "content": f"Who says: \"{lines[start]}\""},
            {"role": "assistant", "content": f"{speaker}."},
        ]
    else:
        messages += [
            {"role": "user", "content": f"Give me a line spoken by {speaker}."},
            {"role": "assistant", "content": lines[start]},
        ]
    if kind == "what_next":
        for follow in lines[start + 1 : start + 1 + rng.randint(1, 3)]:
            messages += [
                {"role": "user", "content": rng.choice(["What comes next?", "And then?", "Go on."])},
                {"role": "assistant", "content": follow},
            ]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "assets/data/tinyshakespeare.txt")
    parser.add_argument("--output", type=Path, default=REPO / "assets/data/chat_example.jsonl")
    parser.add_argument("--conversations", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    pool = speeches(args.corpus)
    records = [conversation(rng, pool) for _ in range(args.conversations)]
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    main()
