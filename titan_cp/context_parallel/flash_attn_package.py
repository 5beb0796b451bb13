"""The flash-attn package (the optional `flash` extra): importing it and calling its private
FA2 functions whatever release is installed. Used by the dense and the varlen kernels alike."""

import importlib
import inspect
from typing import Callable

from titan_cp.errors import UserError
from titan_cp.extras import install_hint

FLASH_INSTALL_HINT = install_hint("flash")


def import_flash_attn_interface():
    """flash_attn.flash_attn_interface, or a one-line UserError saying how to install it."""
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as e:
        raise UserError(
            f"model.attn_implementation = flash_attn needs the flash-attn package ({e}): {FLASH_INSTALL_HINT}"
        ) from None


def call_flash_attn(fn: Callable, **kwargs):
    """Call a flash-attn private function whatever its release spells the defaults as.

    flash-attn 2.6+ takes `window_size_left/right` and `softcap`, earlier 2.x releases one
    `window_size` tuple; the function may also be wrapped as a torch custom op.
    """
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    if "window_size" in params:
        kwargs["window_size"] = (-1, -1)
    else:
        kwargs.update(window_size_left=-1, window_size_right=-1)
    if "softcap" in params:
        kwargs["softcap"] = 0.0
    kwargs["alibi_slopes"] = None
    return fn(**kwargs)
