"""The one registry of local attention kernels, dense and varlen (packed documents) alike.

Every `model.attn_implementation` is one `AttentionKernel` subclass below, registered in
`_KERNELS`; it offers dense attention (`forward`/`backward`, for cp = 1 and the ring) and packed
attention (`varlen_forward`/`varlen_backward`, for the document-aware paths), so what runs for a
name is decided here and nowhere else. Both return the log-sum-exp (LSE) and take it back in
backward.

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

from typing import Callable

import torch
from torch import Tensor

from titan_cp.context_parallel import cudnn_varlen, varlen_kernels
from titan_cp.context_parallel.flash_attn_package import call_flash_attn, import_flash_attn_interface
from titan_cp.context_parallel.varlen_kernels import VarlenSegments
from titan_cp.errors import UserError

aten = torch.ops.aten

IMPLEMENTATIONS = ("cudnn", "flash", "sdpa_cpu", "flash_attn")
_KEY = "model.attn_implementation"


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

    # Packed documents (varlen_kernels.py states the layout and the bottom-right causal mask).
    varlen_name: str = ""  # what packed attention runs, for the startup log and the benchmark

    def varlen_forward(
        self, q: Tensor, k: Tensor, v: Tensor, segments: VarlenSegments, scale: float
    ) -> tuple[Tensor, Tensor]:
        """Causal attention per segment: q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]` -> out like q, lse
        fp32 `[Hq, Tq]`. Query head h uses KV head h // (Hq / Hkv)."""
        raise NotImplementedError

    def varlen_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        segments: VarlenSegments, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of `varlen_forward` from its saved out and lse; dk/dv have Hkv heads."""
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

    # No CPU varlen op exists: exact fp32 masked math per segment (the CPU reference path).
    varlen_name = "fp32 masked math per document"
    varlen_forward = staticmethod(varlen_kernels.math_varlen_forward)
    varlen_backward = staticmethod(varlen_kernels.math_varlen_backward)


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

    varlen_name = "FA2 varlen (aten)"
    varlen_forward = staticmethod(varlen_kernels.flash_varlen_forward)
    varlen_backward = staticmethod(varlen_kernels.flash_varlen_backward)


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

    # Packed documents: cuDNN's THD kernel when nvidia-cudnn-frontend is installed, else FA2
    # varlen (PyTorch has no cuDNN varlen op whose backward takes a saved LSE); cudnn_varlen.py.
    @property
    def varlen_name(self) -> str:
        if cudnn_varlen.cudnn_varlen_available():
            return "cuDNN THD (nvidia-cudnn-frontend)"
        return f"FA2 varlen (aten; {cudnn_varlen.CUDNN_INSTALL_HINT} for cuDNN)"

    @staticmethod
    def _cudnn_runs(segments: VarlenSegments) -> bool:
        return cudnn_varlen.cudnn_varlen_available() and cudnn_varlen.fits(segments)

    def varlen_forward(self, q, k, v, segments, scale):
        if self._cudnn_runs(segments):
            return cudnn_varlen.cudnn_varlen_forward(q, k, v, segments, scale)
        return varlen_kernels.flash_varlen_forward(q, k, v, segments, scale)

    def varlen_backward(self, dout, q, k, v, out, lse, segments, scale):
        if self._cudnn_runs(segments):
            return cudnn_varlen.cudnn_varlen_backward(dout, q, k, v, out, lse, segments, scale)
        return varlen_kernels.flash_varlen_backward(dout, q, k, v, out, lse, segments, scale)


class FlashAttnPackageKernel(AttentionKernel):
    """The flash-attn package's FA2 functions (optional extra). GQA is native."""

    name = "flash_attn"
    native_gqa = True

    def __init__(self) -> None:
        interface = import_flash_attn_interface()
        self._fwd = interface._flash_attn_forward
        self._bwd = interface._flash_attn_backward

    def _forward(self, q, k, v, causal, scale):
        out, lse, *_ = call_flash_attn(
            self._fwd, q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal,
            return_softmax=False,
        )  # fmt: skip
        return out, lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        call_flash_attn(
            self._bwd, dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(), softmax_lse=lse,
            dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal, deterministic=False,
        )  # fmt: skip
        return dq, dk, dv

    # At cp = 1; with cp > 1 the whole all-gather attention is ring-flash-attn's (varlen_attention.py).
    varlen_name = "flash-attn FA2 varlen"
    varlen_forward = staticmethod(varlen_kernels.package_varlen_forward)
    varlen_backward = staticmethod(varlen_kernels.package_varlen_backward)


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
