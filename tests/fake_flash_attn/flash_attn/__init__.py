"""A CPU test double for the flash-attn package: NOT flash-attn, and never imported by titan_cp.

flash-attn ships only as a CUDA source build, yet ring-flash-attn (and titan_cp's `flash_attn`
kernel) import its private FA2 functions. Tests put `tests/fake_flash_attn` on `sys.path` so that
`import flash_attn` finds this package, whose `flash_attn_interface` re-implements those
functions with plain torch math on CPU, following the signatures and conventions of flash-attn
2.7 (bottom-right aligned causal masks, fp32 LSE, in-place gradients, GQA). It is slow and exact,
which is what a test reference should be.
"""

__version__ = "2.7.4"
