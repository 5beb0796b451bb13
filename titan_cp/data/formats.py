"""Dataset formats: records -> token ids and a target mask per document.

The interface the data pipeline builds on:

    encoder = Encoder(tokenizer, dataset_format="auto", train_on_inputs="auto")
    encoder.encode_batch(records) -> [(ids, mask), ...]   # one entry per record, in order
    encoder.fingerprint() -> dict                         # for cache keys
    encode_dataset(path, dataset_format, tokenizer, train_on_inputs, batch_size) -> iterator of (ids, mask)

`ids` is one whole document (a text's BOS + tokens + EOS, or a conversation exactly as the chat
template writes it) and `mask` has the same length: `mask[i]` is True iff token i is a target,
i.e. predicted from `ids[:i]`; `mask[0]` is always False. A record with no tokens gives
`([], [])` from `encode_batch`, and `encode_dataset` leaves it out. `records` are `Record`s from
`titan_cp.data.records` (errors then name the file and line) or plain dicts. An `Encoder` is
picklable, so worker processes can each hold one.

Formats (`training.dataset_format`; `auto` takes the first record's keys, checked in this order):

- `chat`: `messages`, a list of `{role, content}`, rendered by the tokenizer's chat template as
  transformers' `apply_chat_template(messages)` renders and tokenizes it (`chat_template.py`).
- `alpaca`: `instruction`, optional `input`, `output`. With a chat template: the conversation
  user = instruction (+ blank line + input), assistant = output. Without one: the plain prompt
  `### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n` + output.
- `prompt_completion`: `prompt`, `completion`: the two strings joined, no template.
- `text`: `text`: BOS + tokens + EOS (no BOS where the tokenizer has none).
Plain-prompt and text documents are BOS + text + EOS whatever `add_bos_token` says: the EOS
ends the document, which packing needs.

Targets (`training.train_on_inputs`, `auto` = false except for text, which always trains on
every token): when false, the targets are the tokens that overlap an assistant message's content
(an alpaca output, a completion) plus the one token right after each such span, the token that
ends the turn (`<|eot_id|>`, `<|im_end|>`, the EOS of a plain prompt). An assistant message with
empty content has no targets. Each record is one document, and one dataset holds one format.
"""

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import jinja2

from titan_cp.data.chat_template import TemplateRejected, compile_template, render
from titan_cp.data.records import Record, iter_records
from titan_cp.data.tokenizer import Tokenizer
from titan_cp.errors import UserError

FORMATS = ("text", "chat", "alpaca", "prompt_completion")
# Bump when a change here changes the ids or masks of some record: caches keyed on it rebuild.
ENCODING_VERSION = 1
_REQUIRED = {  # format: the fields its records need, as (key, description)
    "chat": (("messages", "a list of {role, content}"),),
    "alpaca": (("instruction", "a string"), ("output", "a string")),
    "prompt_completion": (("prompt", "a string"), ("completion", "a string")),
    "text": (("text", "a string"),),
}
_ASSISTANT = "assistant"
REASONING_END = "</think>"

Span = tuple[int, int]


def detect_format(data: Any) -> str | None:
    """The format a record's keys say (chat, alpaca, prompt_completion, text), or None."""
    if not isinstance(data, dict):
        return None
    for fmt in ("chat", "alpaca", "prompt_completion", "text"):
        if all(key in data for key, _ in _REQUIRED[fmt]):
            return fmt
    return None


def resolve_train_on_inputs(train_on_inputs: bool | str | None, fmt: str) -> bool:
    """`auto`/None: false for chat, alpaca and prompt_completion; text always trains on all."""
    if fmt == "text":
        return True
    if train_on_inputs in (None, "auto"):
        return False
    if isinstance(train_on_inputs, str):
        return train_on_inputs == "true"
    return bool(train_on_inputs)


def resolve_truncation(truncation: str, fmt: str) -> str:
    """`auto`: split text documents, truncate conversations and prompts (docs/chat_data.md)."""
    if truncation == "auto":
        return "split" if fmt == "text" else "truncate"
    return truncation


class Encoder:
    """Records of one dataset -> (ids, mask) per document; see the module docstring."""

    def __init__(
        self, tokenizer: Tokenizer, dataset_format: str = "auto", train_on_inputs: bool | str | None = "auto"
    ) -> None:
        if dataset_format != "auto" and dataset_format not in FORMATS:
            raise UserError(
                f"training.dataset_format: {dataset_format!r} is not one of auto, {', '.join(FORMATS)}"
            )
        self.tokenizer = tokenizer
        self.dataset_format = dataset_format
        self.train_on_inputs = train_on_inputs
        self.format: str | None = None if dataset_format == "auto" else dataset_format
        self._decided_at = "training.dataset_format"  # what fixed self.format, for error messages
        if tokenizer.chat_template is not None:
            self._check_template_parses()

    def fingerprint(self) -> dict:
        """Everything besides the data files that decides the ids and masks."""
        template = self.tokenizer.chat_template
        return {
            "encoding_version": ENCODING_VERSION,
            "dataset_format": self.dataset_format,
            "train_on_inputs": str(self.train_on_inputs).lower(),
            "chat_template_sha256": None if template is None else hashlib.sha256(template.encode()).hexdigest(),
            "tokenizer_files": self.tokenizer.file_hashes(),
        }

    def encode_batch(self, records: Iterable[Record | dict]) -> list[tuple[list[int], list[bool]]]:
        """(ids, mask) of each record, in order; UserError names the record for bad input."""
        records = [
            r if isinstance(r, Record) else Record(r, Path("<records>"), "record", n)
            for n, r in enumerate(records, start=1)
        ]
        if not records:
            return []
        if self.format is None:
            self.format = self._first_format(records[0])
        train_on_inputs = resolve_train_on_inputs(self.train_on_inputs, self.format)
        texts, spans, plain = [], [], []
        for record in records:
            self._check_fields(record)
            text, record_spans, is_plain = self._render(record, train_on_inputs)
            texts.append(text)
            spans.append(record_spans)
            plain.append(is_plain)
        if train_on_inputs:  # every token is a target: no spans to place, no offsets needed
            return [self._all_targets(ids, is_plain) for ids, is_plain in zip(self.tokenizer.encode_batch(texts), plain)]
        return [
            self._document(ids, offsets, record_spans, is_plain)
            for (ids, offsets), record_spans, is_plain in zip(
                self.tokenizer.encode_batch_with_offsets(texts), spans, plain
            )
        ]

    # --- format and fields -------------------------------------------------------------------

    def _first_format(self, record: Record) -> str:
        fmt = detect_format(record.data)
        if fmt is None:
            keys = ", ".join(map(str, record.data)) if isinstance(record.data, dict) else type(record.data).__name__
            raise UserError(
                f"training.dataset_format = auto: {record.where} has none of the fields of a known format"
                f" (messages | instruction+output | prompt+completion | text; it has: {keys})"
            )
        self._decided_at = f"training.dataset_format = auto took it from {record.where}"
        return fmt

    def _check_fields(self, record: Record) -> None:
        data = record.data
        for key, description in _REQUIRED[self.format]:
            value = data.get(key)
            if key == "messages" and isinstance(value, list) or key != "messages" and isinstance(value, str):
                continue
            other = detect_format(data)
            if other is not None and other != self.format:
                raise UserError(
                    f"training.dataset_path: {record.where} is a record of format {other} in a dataset of format {self.format}"
                    f" ({self._decided_at}); a dataset holds one format"
                )
            found = "missing" if key not in data else f"a {type(value).__name__}"
            raise UserError(
                f"training.dataset_path: {record.where} needs '{key}' ({description}) for"
                f" dataset_format {self.format}, found {found}"
            )
        if self.format == "alpaca" and not isinstance(data.get("input") or "", str):
            raise UserError(f"training.dataset_path: {record.where} 'input' must be a string")
        if self.format == "chat":
            _check_messages(record)

    # --- rendering ---------------------------------------------------------------------------

    def _render(self, record: Record, train_on_inputs: bool) -> tuple[str, list[Span], bool]:
        """(text, target character spans, whether BOS/EOS are added around the text)."""
        data = record.data
        if self.format == "text":
            return data["text"], [], True
        if self.format == "prompt_completion":
            return data["prompt"] + data["completion"], [(len(data["prompt"]), -1)], True
        if self.format == "alpaca":
            instruction, extra, output = data["instruction"], data.get("input") or "", data["output"]
            if self.tokenizer.chat_template is None:
                prompt = f"### Instruction:\n{instruction}\n\n"
                if extra:
                    prompt += f"### Input:\n{extra}\n\n"
                prompt += "### Response:\n"
                return prompt + output, [(len(prompt), -1)], True
            user = f"{instruction}\n\n{extra}" if extra else instruction
            messages = [{"role": "user", "content": user}, {"role": _ASSISTANT, "content": output}]
        else:
            messages = data["messages"]
        text = self._render_chat(record, messages)
        return text, ([] if train_on_inputs else _assistant_spans(record, messages, text)), False

    def _render_chat(self, record: Record, messages: list[dict]) -> str:
        tokenizer = self.tokenizer
        if tokenizer.chat_template is None:
            raise UserError(
                f"training.dataset_format = {self.format}: tokenizer {tokenizer.path} has no chat template"
                f" (add 'chat_template' to its tokenizer_config.json or a chat_template.jinja file)"
            )
        try:
            return render(compile_template(tokenizer.chat_template), messages, tokenizer.special_tokens)
        except TemplateRejected as e:
            raise UserError(
                f"training.dataset_path: {record.where}: the chat template of {tokenizer.chat_template_source}"
                f" rejects this conversation: {e}"
            ) from None

    def _check_template_parses(self) -> None:
        try:
            compile_template(self.tokenizer.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(
                f"model.tokenizer_path: the chat template in {self.tokenizer.chat_template_source} is not valid"
                f" Jinja ({e.message}, template line {e.lineno})"
            ) from None

    # --- tokens and mask ---------------------------------------------------------------------

    def _all_targets(self, ids: list[int], plain: bool) -> tuple[list[int], list[bool]]:
        if not ids:
            return [], []
        if plain:
            ids = self._head() + ids + [self.tokenizer.eos_id]
        return ids, [False] + [True] * (len(ids) - 1)

    def _head(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def _document(
        self, ids: list[int], offsets: list[Span], spans: list[Span], plain: bool
    ) -> tuple[list[int], list[bool]]:
        """ids (with BOS/EOS around plain text) and the mask of the tokens the spans cover."""
        if not ids:
            return [], []
        if plain:
            head = self._head()
            ids = head + ids + [self.tokenizer.eos_id]
            offsets = [(0, 0)] * len(head) + offsets + [(offsets[-1][1], offsets[-1][1])]
        mask = [False] * len(ids)
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]
        for start, end in spans:
            end = ends[-1] if end < 0 else end
            first = bisect.bisect_right(ends, start)  # first token ending after the span starts
            stop = bisect.bisect_left(starts, end, lo=first)  # first token starting at or after its end
            if first < stop:
                # The span's tokens and the one after them, the token that ends the turn.
                last = min(stop + 1, len(ids))
                mask[first:last] = [True] * (last - first)
        mask[0] = False
        return ids, mask


def _check_messages(record: Record) -> None:
    messages = record.data["messages"]
    if not messages:
        raise UserError(f"training.dataset_path: {record.where} has an empty 'messages' list")
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(
                f"training.dataset_path: {record.where} message {n} is not a {{role, content}} object with a"
                " 'role' string"
            )
        content = message.get("content")
        if message["role"] == _ASSISTANT and content is not None and not isinstance(content, str):
            raise UserError(
                f"training.dataset_path: {record.where} message {n} (assistant) 'content' must be a string,"
                f" got {type(content).__name__}"
            )


def _assistant_spans(record: Record, messages: list[dict], text: str) -> list[Span]:
    """Where each assistant message's content is in the rendered text.

    Messages are found in order, each searched from where the previous one ended, so an answer
    that repeats its question is found in the answer. The search is for the stripped content
    (templates often `trim` it), then widened to the whitespace around it where the template
    kept that; content with "</think>" that is not found whole is searched for by its part after
    the last "</think>" (reasoning templates drop the reasoning of earlier turns). A message that
    does not appear (a template that rewrites it) is skipped unless it is an assistant's, which
    is an error: its targets would be unknown.
    """
    spans = []
    cursor = 0
    for n, message in enumerate(messages, start=1):
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            continue
        core = content.strip()
        at = text.find(core, cursor)
        if at < 0 and REASONING_END in content:
            # Reasoning templates drop an answer's "<think>...</think>" part: the answer is the rest.
            content = content.split(REASONING_END)[-1]
            core = content.strip()
            at = text.find(core, cursor) if core else -1
        if at < 0:
            if message["role"] == _ASSISTANT:
                raise UserError(
                    f"training.dataset_path: {record.where} message {n} (assistant) does not appear in the text"
                    " its chat template renders, so its targets are unknown; set training.train_on_inputs = true"
                )
            continue
        lead = content[: len(content) - len(content.lstrip())]
        trail = content[len(content.rstrip()) :]
        start, end = at, at + len(core)
        if lead and text[start - len(lead) : start] == lead:
            start -= len(lead)
        if trail and text[end : end + len(trail)] == trail:
            end += len(trail)
        if message["role"] == _ASSISTANT:
            spans.append((start, end))
        cursor = end
    return spans


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def encode_dataset(
    path: str | Path,
    dataset_format: str,
    tokenizer: Tokenizer,
    train_on_inputs: bool | str | None = "auto",
    batch_size: int = 1024,
) -> Iterator[tuple[list[int], list[bool]]]:
    """(ids, mask) of every non-empty document under `path`, in order, read as a stream."""
    encoder = Encoder(tokenizer, dataset_format, train_on_inputs)
    for batch in batched(iter_records(path), batch_size):
        for ids, mask in encoder.encode_batch(batch):
            if ids:
                yield ids, mask
