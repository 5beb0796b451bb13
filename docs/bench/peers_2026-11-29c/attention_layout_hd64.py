"""One-off: cuDNN causal attention fwd+bwd at head size 64, 64K tokens: the tensor layout titan_cp
passes ([B, S, H, D] memory, viewed as [B, H, S, D]) against contiguous [B, H, S, D]."""
import torch
from titan_cp.context_parallel.kernels import get_kernel, local_attention

torch.manual_seed(0)
B, S, H, HKV, D = 1, 65536, 32, 8, 64
kernel = get_kernel("cudnn")
flops = 7 * H * D * S * S


def timed(make, reps=5):
    q, k, v, dout = make()
    for i in range(reps + 2):
        if i == 2:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = local_attention(q, k, v, kernel)
        out.backward(dout)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bshd():  # what the model passes: [B, S, H, D] tensors
    t = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return t(H), t(HKV), t(HKV), torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)


def bhsd():  # the same logical [B, S, H, D] tensors, stored [B, H, S, D]
    t = lambda h: torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    return t(H), t(HKV), t(HKV), torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


for name, make in (("bshd", bshd), ("bhsd", bhsd), ("bshd", bshd), ("bhsd", bhsd)):
    ms = timed(make)
    print(f"{name} {ms:.1f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
