"""Tokenizer, token cache, windows or packed samples, and the stateful per-dp-rank loader.

The loader (and torch with it) is imported on first use: the worker processes that encode
records import modules of this package and should not pay for torch.
"""

from titan_cp.data.tokenizer import Tokenizer

__all__ = ["Batch", "DataLoader", "Tokenizer", "build_dataloader"]


def __getattr__(name: str):
    if name in ("Batch", "DataLoader", "build_dataloader"):
        from titan_cp.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
