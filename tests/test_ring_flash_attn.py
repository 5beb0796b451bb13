"""The ring-flash-attn path (attn_implementation = flash_attn, cp > 1) equals full attention.

flash-attn cannot be installed here, so the workers put the CPU stand-in (tests/fake_flash_attn)
on sys.path; ring-flash-attn itself is the real 0.1.8 package. Its batch rings are only correct
for 16-bit inputs (see the adapter), so this runs in bf16 and compares with an fp32 reference
on the same bf16-rounded inputs, at bf16 tolerance.
"""

import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.dist_utils import run_distributed
from tests.fake_flash_attn import use_fake_flash_attn
from tests.test_ring_attention import _full_inputs, _full_reference
from titan_cp.config.schema import Parallelism
from titan_cp.context_parallel import ContextParallel, shard
from titan_cp.context_parallel import ring_flash_attn_adapter as adapter
from titan_cp.errors import UserError

BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _check(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    use_fake_flash_attn()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    for balancer, layout in (("zigzag", "zigzag"), ("none", "contiguous")):
        parallelism = Parallelism(context_parallel_load_balancer=balancer)
        cp = ContextParallel(mesh, parallelism, "flash_attn", False, torch.device("cpu"))
        for batch, seq_len, hq, hkv in ((1, 32, 8, 2), (2, 64, 4, 4)):
            where = f"rank {rank} {layout} B={batch} S={seq_len} {hq}/{hkv} heads"
            cp.validate(seq_len, hkv)
            q, k, v, dout = (x.bfloat16().float() for x in _full_inputs(batch, seq_len, hq, hkv, seed=5))
            ref_out, _, ref_grads = _full_reference(q, k, v, dout)
            positions = torch.arange(seq_len).expand(batch, seq_len)
            *_, context = cp.shard(positions, positions, positions)
            local = [shard(x, rank, world_size, layout).bfloat16().requires_grad_() for x in (q, k, v)]
            out = cp.attention(*local, context)
            out.backward(shard(dout, rank, world_size, layout).bfloat16())
            want = shard(ref_out, rank, world_size, layout)
            torch.testing.assert_close(out.float(), want, **BF16_TOL, msg=where)
            for name, x, want in zip("qkv", local, ref_grads):
                want = shard(want, rank, world_size, layout)
                torch.testing.assert_close(x.grad.float(), want, **BF16_TOL, msg=f"d{name} {where}")
    dist.barrier()


def test_ring_flash_attn_equals_full_attention_cp2():
    run_distributed(_check, 2)


def test_fp32_is_refused_in_one_line():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(UserError, match="needs bf16 or fp16 activations, got torch.float32"):
        adapter.ring_flash_attention(q, q, q, None, "zigzag")


def _forget_loaded_modules(monkeypatch) -> None:
    for name in [n for n in sys.modules if n == adapter._ALIAS or n.startswith(adapter._ALIAS + ".")]:
        monkeypatch.delitem(sys.modules, name)


def test_missing_ring_flash_attn_is_one_line(monkeypatch):
    _forget_loaded_modules(monkeypatch)
    monkeypatch.setattr(adapter, "_PACKAGE", "no_such_ring_flash_attn_package")
    with pytest.raises(UserError, match=r"needs the ring-flash-attn package: pip install -e '\.\[flash\]'"):
        adapter.ring_flash_attn_module("zigzag_ring_flash_attn")


def test_missing_flash_attn_is_one_line(monkeypatch):
    _forget_loaded_modules(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", None)
    with pytest.raises(UserError, match=r"needs the flash-attn package: pip install -e '\.\[flash\]'"):
        adapter.ring_flash_attn_module("zigzag_ring_flash_attn")
