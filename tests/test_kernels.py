"""The LSE-returning kernels against F.scaled_dot_product_attention and a hand-computed LSE.

These kernels call private aten ops (and flash-attn's private functions); if torch changes a
signature or a meaning, these tests are where it must show. Every kernel that can run on this
machine is called: sdpa_cpu and flash_attn (through the CPU stand-in) here, cudnn and flash on a
CUDA machine.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from tests.fake_flash_attn import use_fake_flash_attn
from titan_cp.context_parallel.kernels import get_kernel, local_attention, resolve_attn_implementation
from titan_cp.errors import UserError


def _available() -> list[tuple[str, str]]:
    cases = [("sdpa_cpu", "cpu"), ("flash_attn", "cpu")]
    if torch.cuda.is_available():
        cases += [("flash", "cuda")]
        if torch.backends.cudnn.is_available() and torch.cuda.get_device_capability() >= (9, 0):
            cases += [("cudnn", "cuda")]
    return cases


def _kernel(name: str):
    if name == "flash_attn":
        use_fake_flash_attn()
    return get_kernel(name)


def _reference(q, k, v, causal):
    """(out, lse) from public ops in fp32: SDPA for out, logsumexp of the scores for the LSE."""
    q32, k32, v32 = (x.float().transpose(1, 2) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k32, v32 = k32.repeat_interleave(group, dim=1), v32.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal).transpose(1, 2)
    scores = q32 @ k32.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


def _inputs(device, dtype, s_q, s_k, hq, hkv, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(2, s_q, hq, 16), (2, s_k, hkv, 16), (2, s_k, hkv, 16), (2, s_q, hq, 16)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


SHAPES = [  # (s_q, s_k, q heads, kv heads, causal)
    (32, 32, 4, 4, True),
    (32, 32, 8, 2, True),
    (16, 32, 8, 2, False),
    (32, 16, 4, 4, False),
]


@pytest.mark.parametrize("name,device", _available())
@pytest.mark.parametrize("s_q,s_k,hq,hkv,causal", SHAPES)
def test_kernel_matches_sdpa(name, device, s_q, s_k, hq, hkv, causal):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kernel = _kernel(name)
    q, k, v, dout = _inputs(device, dtype, s_q, s_k, hq, hkv)
    out, lse = kernel.forward(q, k, v, causal)
    ref_out, ref_lse = _reference(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, hq, s_q) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, **_tol(dtype))
    torch.testing.assert_close(lse, ref_lse, **_tol(dtype))

    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = _reference(*leaves, causal)[0]
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())
    for got, want, like in zip((dq, dk, dv), ref_grads, (q, k, v)):
        assert got.shape == like.shape
        torch.testing.assert_close(got.float(), want, **_tol(dtype))


@pytest.mark.parametrize("name,device", _available())
def test_backward_uses_the_given_merged_out_and_lse(name, device):
    """Ring attention's premise: per-block backward against the merged out/LSE sums to the full gradient."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kernel = _kernel(name)
    q, k, v, dout = _inputs(device, dtype, 32, 32, 8, 2, seed=1)
    half = 16
    blocks = [(k[:, :half], v[:, :half]), (k[:, half:], v[:, half:])]
    partial = [kernel.forward(q, kb, vb, False) for kb, vb in blocks]
    lse = torch.logaddexp(partial[0][1], partial[1][1])
    out = sum(o.float() * torch.exp(l - lse).transpose(1, 2).unsqueeze(-1) for o, l in partial)
    grads = [kernel.backward(dout, q, kb, vb, out.to(dtype), lse, False) for kb, vb in blocks]
    dq = grads[0][0].float() + grads[1][0].float()
    dk = torch.cat([grads[0][1], grads[1][1]], dim=1).float()
    dv = torch.cat([grads[0][2], grads[1][2]], dim=1).float()

    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = _reference(*leaves, False)[0]
    torch.testing.assert_close(out, ref, **_tol(dtype))
    for got, want in zip((dq, dk, dv), torch.autograd.grad(ref, leaves, dout.float())):
        torch.testing.assert_close(got, want, **_tol(dtype))


def test_local_attention_autograd_matches_sdpa():
    q, k, v, dout = _inputs("cpu", torch.float32, 32, 32, 8, 2, seed=2)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = local_attention(*leaves, get_kernel("sdpa_cpu"), causal=True)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_leaves, True)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, dout)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resolve_auto_and_explicit_on_cpu():
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa_cpu"
    assert resolve_attn_implementation("sdpa_cpu", torch.device("cpu")) == "sdpa_cpu"


@pytest.mark.parametrize("name", ["cudnn", "flash"])
def test_resolve_refuses_cuda_kernels_on_cpu(name):
    with pytest.raises(UserError, match=f"model.attn_implementation = {name} needs a CUDA device"):
        resolve_attn_implementation(name, torch.device("cpu"))


def test_resolve_flash_attn_without_the_package(monkeypatch):
    # A None entry in sys.modules makes the import fail, whether or not flash_attn is installed.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[flash\]'") as info:
        resolve_attn_implementation("flash_attn", torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_flash_attn_test_double_refuses_what_it_does_not_model():
    use_fake_flash_attn()
    from flash_attn.flash_attn_interface import _flash_attn_forward

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError):
        _flash_attn_forward(q, q, q, 0.1, 1.0, True)
