"""The ring-flash-attn package (the optional `flash` extra) behind titan_cp's attention API.

ring-flash-attn 0.1.8 is pure Python over flash-attn's private FA2 functions. Two of its quirks
shape this file:
- Its package `__init__` imports its Hugging Face adapter, which needs transformers and breaks
  with transformers >= 5 (it imports a helper that moved). titan_cp uses none of that adapter,
  so `ring_flash_attn_module` loads the function modules from the installed package directly,
  under a private package name, without running that `__init__`.
- Its batch functions default to `causal=False`; we always pass `causal=True`.
- Its batch rings assume 16-bit inputs, as flash-attn itself does: the contiguous ring returns
  dq in bf16 whatever the input dtype, and with fp32 inputs both rings' dq accumulator aliases a
  scratch buffer (`.to(torch.float32)` is then no copy) and comes out wrong. So this path refuses
  anything but bf16/fp16 with a UserError rather than return a wrong gradient.
"""

import importlib
import importlib.util
import sys
import types

import torch
import torch.distributed as dist

from titan_cp.context_parallel.flash_attn_package import FLASH_INSTALL_HINT
from titan_cp.context_parallel.sharding import Layout
from titan_cp.errors import UserError

_PACKAGE = "ring_flash_attn"
_ALIAS = "_titan_cp_ring_flash_attn"


def ring_flash_attn_module(name: str) -> types.ModuleType:
    """`ring_flash_attn.<name>` (e.g. "zigzag_ring_flash_attn"), without the package `__init__`.

    Raises a one-line UserError when ring-flash-attn or flash-attn is not installed.
    """
    if _ALIAS not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"model.attn_implementation = flash_attn needs the ring-flash-attn package: {FLASH_INSTALL_HINT}"
            )
        package = types.ModuleType(_ALIAS)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[_ALIAS] = package
    try:
        return importlib.import_module(f"{_ALIAS}.{name}")
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "flash_attn":
            raise UserError(
                f"model.attn_implementation = flash_attn needs the flash-attn package: {FLASH_INSTALL_HINT}"
            ) from None
        raise


def ring_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: dist.ProcessGroup, layout: Layout
) -> torch.Tensor:
    """Causal ring attention through ring-flash-attn; same contract as `ring_attention`.

    q `[B, S/cp, Hq, D]`, k/v `[B, S/cp, Hkv, D]` are this rank's shards in `layout`.
    """
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise UserError(
            "model.attn_implementation = flash_attn with cp > 1 needs bf16 or fp16 activations,"
            f" got {q.dtype}; use training.mixed_precision_param = bfloat16 or another attn_implementation"
        )
    if layout == "zigzag":
        fn = ring_flash_attn_module("zigzag_ring_flash_attn").zigzag_ring_flash_attn_func
    else:
        fn = ring_flash_attn_module("ring_flash_attn").ring_flash_attn_func
    return fn(q, k, v, causal=True, group=cp_group)
