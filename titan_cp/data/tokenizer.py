"""A thin wrapper over a Hugging Face `tokenizer.json` that knows Llama 3's special tokens.

The loader adds BOS/EOS itself, so `encode` never adds specials: the same code then works for
the shipped tokenizer and for a real Llama 3 `tokenizer.json` (whose post-processor would
otherwise prepend BOS).
"""

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from titan_cp.errors import UserError

BOS_NAMES = ("<|begin_of_text|>", "<s>")
EOS_NAMES = ("<|end_of_text|>", "</s>")
PAD_NAMES = ("<|pad|>", "<pad>")


class Tokenizer:
    """Text <-> token ids, plus the BOS, EOS and padding ids the data pipeline needs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"model.tokenizer_path: tokenizer file {self.path} does not exist")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"model.tokenizer_path: {self.path} is not a Hugging Face tokenizer.json ({reason})"
            ) from None
        self.bos_id = self._find(BOS_NAMES, "BOS")
        self.eos_id = self._find(EOS_NAMES, "EOS")
        pad = [self._tok.token_to_id(name) for name in PAD_NAMES]
        # Padding is never a target (its labels are -100), so EOS is a safe stand-in.
        self.pad_id: int = next((i for i in pad if i is not None), self.eos_id)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    def _find(self, names: tuple[str, ...], role: str) -> int:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise UserError(
            f"model.tokenizer_path: {self.path} has no {role} token (looked for {' or '.join(names)})"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts at once (parallel inside the tokenizers library)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
