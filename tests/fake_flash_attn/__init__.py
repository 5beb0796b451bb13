"""Puts the CPU stand-in for flash-attn (the `flash_attn` folder here) on sys.path for tests."""

import os
import sys

FAKE_FLASH_ATTN_DIR = os.path.dirname(os.path.abspath(__file__))


def use_fake_flash_attn() -> None:
    """Make `import flash_attn` find the stand-in; call it in spawned workers too."""
    if FAKE_FLASH_ATTN_DIR not in sys.path:
        sys.path.insert(0, FAKE_FLASH_ATTN_DIR)
