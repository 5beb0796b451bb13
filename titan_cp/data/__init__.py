"""Tokenizer, documents, windows or packed samples, and the stateful per-dp-rank loader."""

from titan_cp.data.loader import Batch, DataLoader, build_dataloader
from titan_cp.data.tokenizer import Tokenizer

__all__ = ["Batch", "DataLoader", "Tokenizer", "build_dataloader"]
