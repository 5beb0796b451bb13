"""Local attention kernels that return the log-sum-exp (LSE) and take it back in backward.

Ring attention computes attention one K/V block at a time, merges the partial outputs through
their LSE, and runs every block's backward against the *merged* output and LSE. So a kernel must
(1) return the LSE from its forward and (2) offer a backward that accepts an output and LSE it
did not compute itself. No public torch op does either: `F.scaled_dot_product_attention` returns
no LSE and its backward is reachable only through autograd. The kernels below therefore call the
private aten ops behind SDPA (the ones torch's own context parallelism uses) or flash-attn's
private functions. tests/test_kernels.py calls every kernel available and compares it with
`F.scaled_dot_product_attention` and a hand-computed LSE, so a changed signature or meaning
fails loudly there rather than silently here.

Conventions for every kernel: q `[B, S_q, Hq, D]`, k/v `[B, S_k, Hkv, D]` with `Hq % Hkv == 0`
(GQA: query head h uses KV head `h // (Hq // Hkv)`), out like q, LSE fp32 `[B, Hq, S_q]`, softmax
scale `D ** -0.5`. `causal` is only asked for on square blocks (S_q == S_k), where the top-left
(aten) and bottom-right (flash-attn) conventions agree.
"""

import importlib
import inspect
from typing import Callable

import torch

from titan_cp.errors import UserError

aten = torch.ops.aten

IMPLEMENTATIONS = ("cudnn", "flash", "sdpa_cpu", "flash_attn")
_KEY = "model.attn_implementation"
FLASH_INSTALL_HINT = "pip install titan_cp[flash]"


class AttentionKernel:
    """One local attention implementation.

    Subclasses implement `_forward`/`_backward` on tensors in the public layout whose KV heads
    already match what the kernel accepts; this base class repeats KV heads for kernels without
    native GQA. The repeat happens here, on local tensors, i.e. after any communication, so only
    the KV heads ever travel between ranks.
    """

    name: str = ""
    native_gqa: bool = False

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, S_q, Hq, D] in q's dtype, lse fp32 [B, Hq, S_q])."""
        group = _check_shapes(q, k, v, causal)
        if group > 1 and not self.native_gqa:
            k, v = _repeat_kv(k, group), _repeat_kv(v, group)
        out, lse = self._forward(q, k, v, causal, q.shape[-1] ** -0.5)
        return out, lse.float()

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) shaped like q, k, v, given the (possibly merged) out and fp32 lse."""
        group = _check_shapes(q, k, v, causal)
        repeat = group > 1 and not self.native_gqa
        if repeat:
            k, v = _repeat_kv(k, group), _repeat_kv(v, group)
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        lse = lse.float().contiguous()
        dq, dk, dv = self._backward(dout, q, k, v, out, lse, causal, q.shape[-1] ** -0.5)
        if repeat:
            dk, dv = _reduce_kv_grad(dk, group), _reduce_kv_grad(dv, group)
        return dq, dk, dv

    def _forward(self, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _backward(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        raise NotImplementedError


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> int:
    """The GQA group size Hq // Hkv, after checking the shapes agree."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        shapes = f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}"
        raise ValueError(f"attention shapes {shapes} do not match")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs a square block, got S_q {q.shape[1]} and S_k {k.shape[1]}")
    return q.shape[2] // k.shape[2]


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, dim=2)


def _reduce_kv_grad(dx: torch.Tensor, group: int) -> torch.Tensor:
    b, s, h, d = dx.shape
    return dx.view(b, s, h // group, group, d).sum(dim=3)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> the [B, H, S, D] view the aten SDPA ops take."""
    return x.transpose(1, 2)


class SdpaCpuKernel(AttentionKernel):
    """PyTorch's CPU flash-style kernel (fp32/bf16); the only CPU op that returns the LSE."""

    name = "sdpa_cpu"

    def _forward(self, q, k, v, causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale
        )
        return _bhsd(out), lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, causal, scale=scale
        )
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)


class FlashKernel(AttentionKernel):
    """FlashAttention-2 as built into PyTorch (CUDA). It supports GQA natively."""

    name = "flash"
    native_gqa = True

    def _forward(self, q, k, v, causal, scale):
        out, lse, *_ = aten._scaled_dot_product_flash_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale
        )
        return _bhsd(out), lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        # cum_seq_q/k are None for dense (non-nested) inputs, as the forward returns them, and the
        # philox state is read only with dropout, so an empty tensor stands in for it.
        philox = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse,
            None, None, q.shape[1], k.shape[1], 0.0, causal, philox, philox, scale=scale,
        )  # fmt: skip
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)


class CudnnKernel(AttentionKernel):
    """cuDNN's fused attention (CUDA; the fastest on Hopper), with cuDNN's own GQA.

    The aten op takes fewer K/V heads than query heads and returns dK/dV per K/V head. Its
    backward kernel is a little slower than with repeated heads, but skipping the repeat and the
    gradient reduction is a net gain: 2-4% on the ring at 32K and 1% at 128K on 2 H200s
    (scripts/profile_ring.py --gqa repeat native, docs/performance.md).
    """

    name = "cudnn"
    native_gqa = True

    def _forward(self, q, k, v, causal, scale):
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False, scale=scale
        )
        # Some torch versions return the statistics as [B, H, S, 1].
        return _bhsd(out), lse.reshape(q.shape[0], q.shape[2], q.shape[1])

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        # As for flash: None cum_seq for dense inputs (a defined one means nested), and philox
        # state that only dropout reads.
        philox = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1),
            philox, philox, None, None, None, q.shape[1], k.shape[1], 0.0, causal, scale=scale,
        )  # fmt: skip
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)


class FlashAttnPackageKernel(AttentionKernel):
    """The flash-attn package's FA2 functions (optional extra). GQA is native."""

    name = "flash_attn"
    native_gqa = True

    def __init__(self) -> None:
        interface = import_flash_attn_interface()
        self._fwd = interface._flash_attn_forward
        self._bwd = interface._flash_attn_backward

    def _forward(self, q, k, v, causal, scale):
        out, lse, *_ = _call_flash_attn(
            self._fwd, q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal,
            return_softmax=False,
        )  # fmt: skip
        return out, lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call_flash_attn(
            self._bwd, dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(), softmax_lse=lse,
            dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal, deterministic=False,
        )  # fmt: skip
        return dq, dk, dv


def import_flash_attn_interface():
    """flash_attn.flash_attn_interface, or a one-line UserError saying how to install it."""
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as e:
        raise UserError(
            f"{_KEY} = flash_attn needs the flash-attn package ({e}): {FLASH_INSTALL_HINT}"
        ) from None


def _call_flash_attn(fn: Callable, **kwargs):
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


_KERNELS: dict[str, Callable[[], AttentionKernel]] = {
    "cudnn": CudnnKernel,
    "flash": FlashKernel,
    "sdpa_cpu": SdpaCpuKernel,
    "flash_attn": FlashAttnPackageKernel,
}


def get_kernel(name: str) -> AttentionKernel:
    """The kernel object for a resolved implementation name (see resolve_attn_implementation)."""
    return _KERNELS[name]()


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """The concrete kernel for `name` on `device`, or a one-line UserError if it cannot run there.

    auto picks cuDNN on Hopper (sm90, where it is ~1.7x faster than flash), PyTorch's flash
    kernel on other CUDA GPUs, and the CPU kernel on CPU.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            return "sdpa_cpu"
        if device.type == "cuda":
            hopper = torch.cuda.get_device_capability(device) == (9, 0)
            return "cudnn" if hopper and torch.backends.cudnn.is_available() else "flash"
        raise UserError(f"{_KEY} = auto has no kernel for device type {device.type}; use cuda or cpu")
    if name not in IMPLEMENTATIONS:
        raise UserError(f"{_KEY} = {name} is not one of auto, {', '.join(IMPLEMENTATIONS)}")
    if name in ("cudnn", "flash") and device.type != "cuda":
        raise UserError(
            f"{_KEY} = {name} needs a CUDA device, but the device is {device.type}; use auto or sdpa_cpu"
        )
    if name == "cudnn" and not torch.backends.cudnn.is_available():
        raise UserError(f"{_KEY} = cudnn but this torch build has no cuDNN; use auto or flash")
    if name == "sdpa_cpu" and device.type != "cpu":
        raise UserError(f"{_KEY} = sdpa_cpu runs on CPU only, but the device is {device.type}; use auto")
    if name == "flash_attn":
        # flash-attn decides where it runs (CUDA builds only); we check only that it imports.
        import_flash_attn_interface()
    return name


class _LocalAttention(torch.autograd.Function):
    """Attention over local tensors only, through a kernel's forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, kernel: AttentionKernel, causal: bool):
        out, lse = kernel.forward(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.causal = kernel, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, ctx.causal)
        return dq, dk, dv, None, None


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: AttentionKernel, causal: bool = True
) -> torch.Tensor:
    """Differentiable attention on one rank's tensors (cp=1 without packing)."""
    return _LocalAttention.apply(q, k, v, kernel, causal)
