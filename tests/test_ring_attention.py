"""Ring attention over gloo equals full single-process causal attention (out, LSE, dq, dk, dv).

One spawned run of 4 processes covers every case (cp 4 over all ranks, cp 2 over two sub-groups,
layouts x GQA/MHA x batch sizes x kernels), since starting processes is the expensive part.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from tests.dist_utils import run_distributed
from tests.fake_flash_attn import use_fake_flash_attn
from titan_cp.config.schema import Parallelism
from titan_cp.context_parallel import ContextParallel, get_kernel, ring_attention, shard

CASES = [  # (batch, seq_len, q heads, kv heads)
    (1, 32, 8, 2),
    (2, 64, 4, 4),
]
TOL = dict(rtol=1e-5, atol=1e-5)


def _full_inputs(batch, seq_len, hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, hq, 16, generator=g)
    k = torch.randn(batch, seq_len, hkv, 16, generator=g)
    v = torch.randn(batch, seq_len, hkv, 16, generator=g)
    dout = torch.randn(batch, seq_len, hq, 16, generator=g)
    return q, k, v, dout


def _full_reference(q, k, v, dout):
    """Causal attention without cp: out, LSE [B, H, S] and the gradients, from public ops."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    bhsd = (x.transpose(1, 2) for x in leaves)
    out = F.scaled_dot_product_attention(*bhsd, is_causal=True, enable_gqa=True).transpose(1, 2)
    group = q.shape[2] // k.shape[2]
    scores = q.transpose(1, 2) @ k.repeat_interleave(group, dim=2).permute(0, 2, 3, 1) * q.shape[-1] ** -0.5
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1)
    lse = torch.logsumexp(scores.masked_fill(mask, float("-inf")), dim=-1)
    return out.detach(), lse, torch.autograd.grad(out, leaves, dout)


def _shard_lse(lse, rank, cp, layout):
    return shard(lse.transpose(1, 2), rank, cp, layout).transpose(1, 2)


def _check_ring(group: dist.ProcessGroup) -> None:
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    use_fake_flash_attn()
    kernels = [get_kernel("sdpa_cpu"), get_kernel("flash_attn")]
    for batch, seq_len, hq, hkv in CASES:
        q, k, v, dout = _full_inputs(batch, seq_len, hq, hkv)
        ref_out, ref_lse, ref_grads = _full_reference(q, k, v, dout)
        for layout in ("zigzag", "contiguous"):
            for kernel in kernels:
                where = f"rank {rank} {layout} {kernel.name} B={batch} S={seq_len} {hq}/{hkv} heads"
                local = [shard(x, rank, world_size, layout).requires_grad_() for x in (q, k, v)]
                out, lse = ring_attention(*local, group, layout, kernel, return_lse=True)
                out.backward(shard(dout, rank, world_size, layout))
                torch.testing.assert_close(out, shard(ref_out, rank, world_size, layout), **TOL, msg=where)
                want_lse = _shard_lse(ref_lse, rank, world_size, layout)
                torch.testing.assert_close(lse, want_lse, **TOL, msg=where)
                for name, x, want in zip("qkv", local, ref_grads):
                    got, want = x.grad, shard(want, rank, world_size, layout)
                    torch.testing.assert_close(got, want, **TOL, msg=f"d{name} {where}")


def _check_ring_bf16(group: dist.ProcessGroup) -> None:
    """In bf16 the ring accumulates in bf16 at cp = 2 and in fp32 beyond; both match fp32 attention."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    q, k, v, dout = _full_inputs(1, 64, 8, 2, seed=5)
    ref_out, _, ref_grads = _full_reference(q, k, v, dout)
    local = [shard(x, rank, world_size, "zigzag").bfloat16().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, group, "zigzag", get_kernel("sdpa_cpu"))
    out.backward(shard(dout, rank, world_size, "zigzag").bfloat16())
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), shard(ref_out, rank, world_size, "zigzag"), **tol)
    for name, x, want in zip("qkv", local, ref_grads):
        assert x.grad.dtype == torch.bfloat16
        want = shard(want, rank, world_size, "zigzag")
        torch.testing.assert_close(x.grad.float(), want, **tol, msg=f"d{name} cp={world_size} rank {rank}")


def _check_context_parallel(mesh) -> None:
    """The trainer's entry point: shard full tensors, attend, compare with full attention."""
    rank, world_size = mesh.get_local_rank(), mesh.size()
    q, k, v, dout = _full_inputs(2, 32, 8, 2, seed=3)
    ref_out, _, ref_grads = _full_reference(q, k, v, dout)
    tokens = torch.arange(64).view(2, 32)
    positions = torch.arange(32).expand(2, 32)
    for balancer, layout in (("zigzag", "zigzag"), ("none", "contiguous")):
        cp = ContextParallel(
            mesh, Parallelism(context_parallel_load_balancer=balancer), "auto", False, torch.device("cpu")
        )
        cp.validate(32, 2)
        local_tokens, local_labels, local_positions, context = cp.shard(tokens, tokens + 1, positions)
        assert torch.equal(local_tokens, shard(tokens, rank, world_size, layout))
        assert torch.equal(local_labels, local_tokens + 1)
        assert torch.equal(local_positions, shard(positions, rank, world_size, layout))
        assert context.layout == layout and context.cu_seqlens is None
        local = [shard(x, rank, world_size, layout).requires_grad_() for x in (q, k, v)]
        out = cp.attention(*local, context)
        out.backward(shard(dout, rank, world_size, layout))
        torch.testing.assert_close(out, shard(ref_out, rank, world_size, layout), **TOL)
        for x, want in zip(local, ref_grads):
            torch.testing.assert_close(x.grad, shard(want, rank, world_size, layout), **TOL)


def _check_all(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)  # four processes share a small machine
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    _check_ring(dist.group.WORLD)
    _check_ring(pairs[rank // 2])
    _check_ring_bf16(dist.group.WORLD)
    _check_ring_bf16(pairs[rank // 2])
    _check_context_parallel(init_device_mesh("cpu", (4,), mesh_dim_names=("cp",)))
    _check_context_parallel(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))["cp"])


def test_ring_attention_equals_full_attention_cp2_and_cp4():
    run_distributed(_check_all, 4)


def test_cp1_is_the_local_causal_kernel():
    q, k, v, dout = _full_inputs(2, 32, 8, 2, seed=4)
    ref_out, _, ref_grads = _full_reference(q, k, v, dout)
    cp = ContextParallel(None, Parallelism(), "auto", False, torch.device("cpu"))
    cp.validate(32, 2)
    tokens = torch.arange(64).view(2, 32)
    positions = torch.arange(32).expand(2, 32)
    out_tokens, _, _, context = cp.shard(tokens, tokens, positions)
    assert out_tokens is tokens and context.cu_seqlens is None
    local = [x.clone().requires_grad_() for x in (q, k, v)]
    out = cp.attention(*local, context)
    out.backward(dout)
    torch.testing.assert_close(out, ref_out, **TOL)
    for x, want in zip(local, ref_grads):
        torch.testing.assert_close(x.grad, want, **TOL)


def test_bf16_add_rounds_once():
    """The premise of the ring's cp = 2 bf16 accumulation: a bf16 add computes in fp32 and rounds
    once, so it equals an fp32 sum of the same two values rounded at the end, bit for bit."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(4096, generator=g) * torch.logspace(-3, 3, 4096)).bfloat16()
    b = (torch.randn(4096, generator=g) * torch.logspace(3, -3, 4096)).bfloat16()
    in_place = a.clone()
    in_place[1000:] += b[1000:]
    want = torch.cat([a[:1000], (a[1000:].float() + b[1000:].float()).bfloat16()])
    assert torch.equal(in_place, want)
