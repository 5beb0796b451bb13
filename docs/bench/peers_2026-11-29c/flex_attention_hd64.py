"""One-off: causal attention fwd+bwd at head size 64 (Llama 3.2 1B heads), FlexAttention vs SDPA cuDNN."""
import sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

torch.manual_seed(0)
H, HKV, D = 32, 8, 64
flex = torch.compile(flex_attention, dynamic=False)


def causal(b, h, q, kv):
    return q >= kv


def bench(fn, q, k, v, reps=5):
    for _ in range(2):
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for S in (65536,):
    q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 7 * H * D * S * S  # the attention-kernel convention of docs/performance.md (causal)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = bench(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True), q, k, v)
    print(f"S={S} cudnn {ms:.1f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    mask = create_block_mask(causal, None, None, S, S)
    for opts in (None, {"BLOCK_M": 128, "BLOCK_N": 128}):
        try:
            ms = bench(lambda a, b, c: flex(a, b, c, block_mask=mask, enable_gqa=True, kernel_options=opts), q, k, v)
            print(f"S={S} flex {opts} {ms:.1f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except Exception as e:
            print(f"S={S} flex {opts} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
