"""Document-masked varlen attention (cp = 1 and all-gather K/V, both packed layouts, every kernel
of the registry) against an independent reference: causal SDPA run one document at a time on
the full, unsharded batch (invariants 1 and 5 in docs/architecture.md)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist_utils import run_distributed
from titan_cp.context_parallel import varlen_kernels
from titan_cp.context_parallel.document_sharding import packed_shards
from titan_cp.context_parallel.kernels import get_kernel
from titan_cp.context_parallel.varlen_attention import document_cu_seqlens, varlen_llama3_attention

FAKE_FLASH_ATTN = os.path.join(os.path.dirname(__file__), "fake_flash_attn")
# CUDA tests run on the GPU machine with `python3 -m pytest -m gpu` (CPU runs deselect them).
requires_cuda = pytest.mark.gpu

SEQ = 72  # divisible by 2, 3 and 4
# Sample 0: five uneven documents, several crossing shard edges for every cp in {2, 3, 4} and one
# (54) starting exactly on the cp=4 edge. Sample 1: a document spanning three cp=4 shards and
# documents of one and two tokens.
DOC_LENGTHS = ([7, 23, 5, 19, 18], [40, 1, 2, 29])
N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 4, 2, 8


def packed_positions(doc_lengths=DOC_LENGTHS) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in sample]) for sample in doc_lengths])


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full q, k, v and an upstream gradient for the packed batch, fp32."""
    g = torch.Generator().manual_seed(seed)
    batch = len(DOC_LENGTHS)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "q": randn(batch, SEQ, N_Q_HEADS, HEAD_DIM),
        "k": randn(batch, SEQ, N_KV_HEADS, HEAD_DIM),
        "v": randn(batch, SEQ, N_KV_HEADS, HEAD_DIM),
        "dout": randn(batch, SEQ, N_Q_HEADS, HEAD_DIM),
    }


def per_document_reference(inputs: dict[str, torch.Tensor], doc_lengths=DOC_LENGTHS) -> dict:
    """Out and dq/dk/dv from causal SDPA on each document alone (KV heads repeated for GQA)."""
    q, k, v = (inputs[n].clone().requires_grad_() for n in ("q", "k", "v"))
    rep = q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    for b, sample in enumerate(doc_lengths):
        start = 0
        for n in sample:
            span = slice(start, start + n)
            qd = q[b, span].transpose(0, 1)
            kd = k[b, span].repeat_interleave(rep, dim=1).transpose(0, 1)
            vd = v[b, span].repeat_interleave(rep, dim=1).transpose(0, 1)
            out_doc = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            out[b, span] = out_doc.transpose(0, 1)
            start += n
    out.backward(inputs["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def run_shard(
    inputs: dict, positions: torch.Tensor, group, rank: int, cp: int, stride: int, kernel: str,
    layout: str = "zigzag",
) -> dict:
    """This rank's out/dq/dk/dv from varlen_llama3_attention, scattered back into full-size
    tensors (zero where other ranks' tokens are), so that the ranks' results add up to the whole."""
    shards = packed_shards(document_cu_seqlens(positions).tolist(), *positions.shape, cp, layout)
    q, k, v = (shards.shard(inputs[n], rank).clone().requires_grad_() for n in ("q", "k", "v"))
    out = varlen_llama3_attention(q, k, v, shards, group, stride, get_kernel(kernel))
    out.backward(shards.shard(inputs["dout"], rank))
    local = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {name: _placed(shards, rank, x) for name, x in local.items()}


def _placed(shards, rank: int, x: torch.Tensor) -> torch.Tensor:
    parts = [x if r == rank else torch.zeros_like(x) for r in range(shards.cp)]
    return shards.unshard(parts)


CP_DEGREES = (2, 3, 4)
STRIDES = (1, N_KV_HEADS, 0)  # heads_k_stride: one KV head at a time, all at once, and 0 (the default: all)
LAYOUTS = ("zigzag", "contiguous")
FLASH_ATTN_CP = 3


def _all_cases_worker(rank: int, world_size: int, inputs: dict, positions: torch.Tensor) -> dict:
    """Every distributed case in one spawn (spawning dominates the cost): cp = 2, 3, 4 as
    subgroups of one 4-process world, each with both strides and both packed layouts;
    ring-flash-attn (a test extra) on the repo's CPU stand-in for the flash-attn package at
    cp = 3 (contiguous layout, which it needs)."""
    sys.path.insert(0, FAKE_FLASH_ATTN)
    results = {}
    for cp in CP_DEGREES:
        group = dist.new_group(list(range(cp)))  # every rank must take part in creating it
        if rank >= cp:
            continue
        cases = [("sdpa_cpu", layout) for layout in LAYOUTS]
        cases += [("flash_attn", "contiguous")] if cp == FLASH_ATTN_CP else []
        for kernel, layout in cases:
            for stride in STRIDES:
                shard = run_shard(inputs, positions, group, rank, cp, stride, kernel, layout)
                results[cp, kernel, layout, stride] = shard
    return results


@pytest.fixture(scope="module")
def distributed_results() -> tuple[dict, list[dict]]:
    inputs = make_inputs()
    per_rank = run_distributed(_all_cases_worker, max(CP_DEGREES), inputs, packed_positions())
    return per_document_reference(inputs), per_rank


def assert_matches(shards: list[dict], expected: dict) -> None:
    for name, want in expected.items():
        got = sum(shard[name] for shard in shards)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("cp", CP_DEGREES)
def test_cp_matches_per_document_attention(distributed_results, cp: int, stride: int, layout: str) -> None:
    expected, per_rank = distributed_results
    assert_matches([per_rank[r][cp, "sdpa_cpu", layout, stride] for r in range(cp)], expected)


@pytest.mark.parametrize("stride", STRIDES)
def test_ring_flash_attn_llama3_matches_per_document_attention(
    distributed_results, stride: int
) -> None:
    """kernel flash_attn runs ring-flash-attn's llama3 functions (here on the CPU double)."""
    expected, per_rank = distributed_results
    shards = [per_rank[r][FLASH_ATTN_CP, "flash_attn", "contiguous", stride] for r in range(FLASH_ATTN_CP)]
    assert_matches(shards, expected)


@pytest.mark.parametrize("stride", [1, N_KV_HEADS])
def test_cp1_masks_documents(stride: int) -> None:
    inputs = make_inputs(seed=2)
    positions = packed_positions()
    got = run_shard(inputs, positions, None, 0, 1, stride, "sdpa_cpu")
    assert_matches([got], per_document_reference(inputs))
    # The test can fail: attention over the whole window (one document) differs.
    whole = per_document_reference(inputs, doc_lengths=([SEQ], [SEQ]))
    assert not torch.allclose(whole["out"], per_document_reference(inputs)["out"], atol=1e-3)


def test_document_cu_seqlens() -> None:
    # Sample 1 opens in the middle of a document: its start is a boundary all the same.
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert document_cu_seqlens(positions).tolist() == [0, 3, 5, 6, 8, 12]
    assert document_cu_seqlens(positions).dtype == torch.int32
    assert positions[1, 0] == 3, "the input must not be modified"


@pytest.mark.parametrize("kernel", ["sdpa_cpu", pytest.param("flash", marks=requires_cuda)])
def test_offset_causal_kernel_matches_suffix_of_full_attention(kernel: str) -> None:
    """Queries that are the last tokens of their key segment see keys up to themselves."""
    g = torch.Generator().manual_seed(3)
    key_lens, query_lens = [9, 4, 6], [3, 4, 1]
    device, dtype = ("cpu", torch.float32) if kernel == "sdpa_cpu" else ("cuda", torch.bfloat16)
    k = torch.randn(sum(key_lens), N_KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(sum(key_lens), N_KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    q_full = torch.randn(sum(key_lens), N_Q_HEADS, HEAD_DIM, generator=g).to(dtype)
    starts = [0, 9, 13]
    suffix = torch.cat(
        [torch.arange(s + n - m, s + n) for s, n, m in zip(starts, key_lens, query_lens)]
    )

    def cumulative(lengths: list[int]) -> list[int]:
        return [0] + torch.tensor(lengths).cumsum(0).tolist()

    cu_q, cu_k = cumulative(query_lens), cumulative(key_lens)
    seg = varlen_kernels.VarlenSegments(
        torch.tensor(cu_q, dtype=torch.int32, device=device),
        torch.tensor(cu_k, dtype=torch.int32, device=device),
        max(query_lens), max(key_lens), tuple(cu_q), tuple(cu_k),
    )  # fmt: skip
    out, lse = get_kernel(kernel).varlen_forward(
        q_full[suffix].to(device), k.to(device), v.to(device), seg, HEAD_DIM**-0.5
    )
    expected, expected_lse = [], []
    for s, n in zip(starts, key_lens):
        qd = q_full[s : s + n].float().transpose(0, 1)
        kd = k[s : s + n].float().repeat_interleave(2, dim=1).transpose(0, 1)
        vd = v[s : s + n].float().repeat_interleave(2, dim=1).transpose(0, 1)
        expected.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
        scores = (qd @ kd.transpose(-1, -2)) * HEAD_DIM**-0.5
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        expected_lse.append(torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1))
    tol = {} if kernel == "sdpa_cpu" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float().cpu(), torch.cat(expected)[suffix], **tol)
    torch.testing.assert_close(lse.cpu(), torch.cat(expected_lse, dim=1)[:, suffix], **tol)


def test_flash_varlen_op_schemas_unchanged() -> None:
    """varlen_kernels calls these private aten ops positionally: a changed schema must fail here."""
    fwd = torch.ops.aten._flash_attention_forward.default._schema
    bwd = torch.ops.aten._flash_attention_backward.default._schema
    assert [a.name for a in fwd.arguments][:10] == [
        "query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
        "is_causal", "return_debug_mask",
    ]  # fmt: skip
    assert "scale" in [a.name for a in fwd.arguments if a.kwarg_only]
    assert [r.name for r in fwd.returns][:2] == ["output", "softmax_logsumexp"]
    assert [a.name for a in bwd.arguments][:14] == [
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q",
        "max_k", "dropout_p", "is_causal", "rng_state", "unused",
    ]  # fmt: skip
    assert "scale" in [a.name for a in bwd.arguments if a.kwarg_only]


def assert_close_bf16(shards: list[dict], expected: dict) -> None:
    """bf16 kernels against the fp32 reference on the same (bf16-rounded) inputs."""
    errors = {}
    for name, want in expected.items():
        got = sum(shard[name].float().cpu() for shard in shards)
        errors[name] = ((got - want).abs().max() / want.abs().max()).item()
    assert max(errors.values()) < 2e-2, f"max errors relative to the largest value: {errors}"


def bf16_inputs(seed: int) -> dict[str, torch.Tensor]:
    return {name: x.bfloat16() for name, x in make_inputs(seed).items()}


@requires_cuda
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
def test_cuda_cp1_matches_per_document_attention(kernel: str) -> None:
    # Head dim 128 (the Llama one; cuDNN's THD kernels want a multiple of 64 or so, not 8).
    inputs = {name: x.repeat(1, 1, 1, 16) for name, x in bf16_inputs(seed=4).items()}
    expected = per_document_reference({name: x.float() for name, x in inputs.items()})
    cuda_inputs = {name: x.cuda() for name, x in inputs.items()}
    for stride in STRIDES:
        got = run_shard(cuda_inputs, packed_positions().cuda(), None, 0, 1, stride, kernel)
        assert got["out"].dtype == torch.bfloat16
        assert_close_bf16([got], expected)


def _nccl_worker(
    rank: int, world_size: int, inputs: dict, positions: torch.Tensor, kernel: str
) -> list:
    torch.cuda.set_device(rank)
    group = dist.new_group(list(range(world_size)), backend="nccl")
    device_inputs = {name: x.cuda() for name, x in inputs.items()}
    results = []
    for stride in STRIDES:
        shard = run_shard(device_inputs, positions.cuda(), group, rank, world_size, stride, kernel)
        results.append({name: x.cpu() for name, x in shard.items()})
    return results


@pytest.mark.gpu(2)
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
def test_nccl_cp2_matches_per_document_attention(kernel: str) -> None:
    inputs = bf16_inputs(seed=5)
    expected = per_document_reference({name: x.float() for name, x in inputs.items()})
    per_rank = run_distributed(_nccl_worker, 2, inputs, packed_positions(), kernel)
    for stride_index in range(len(STRIDES)):
        assert_close_bf16([results[stride_index] for results in per_rank], expected)


# --- the cuDNN THD kernel (nvidia-cudnn-frontend, the [cudnn] extra), on a GPU where it is installed


@requires_cuda
def test_cudnn_kernel_runs_cudnn_thd_where_the_package_is_installed() -> None:
    """On the GPU machine the [cudnn] extra is installed: packed attention must not fall back."""
    from titan_cp.context_parallel.cudnn_varlen import cudnn_varlen_available

    assert cudnn_varlen_available()
    assert get_kernel("cudnn").varlen_name.startswith("cuDNN THD")


def _segments(q_lens: list[int], k_lens: list[int], device: str) -> varlen_kernels.VarlenSegments:
    def cumulative(lengths: list[int]) -> list[int]:
        return [0] + torch.tensor(lengths).cumsum(0).tolist()

    return varlen_kernels.VarlenSegments.from_bounds(cumulative(q_lens), cumulative(k_lens), device)


def _head_slice(x: torch.Tensor) -> torch.Tensor:
    """x's values as the first heads of a tensor with twice the heads (not contiguous)."""
    sliced = torch.cat([x, torch.zeros_like(x)], dim=1)[:, : x.shape[1]]
    assert not sliced.is_contiguous() and torch.equal(sliced, x)
    return sliced


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@requires_cuda
@pytest.mark.parametrize("sliced", [False, True], ids=["dense", "head-slice"])
@pytest.mark.parametrize("suffix", [False, True], ids=["square", "bottom-right"])
def test_cudnn_varlen_matches_fa2_varlen(suffix: bool, sliced: bool) -> None:
    """cuDNN THD and FA2 varlen on the same bf16 segments (Llama-like heads of 128): out, lse and
    gradients agree to bf16 rounding, for whole documents and for query suffixes (cp ranks), and
    for queries that are one head group's slice of a wider tensor (heads_k_stride groups)."""
    g = torch.Generator().manual_seed(7)
    k_lens = [1000, 37, 2048, 513]
    q_lens = [300, 37, 700, 1] if suffix else k_lens
    seg = _segments(q_lens, k_lens, "cuda")
    hq, hkv, d = 8, 2, 128

    def randn(n: int, h: int) -> torch.Tensor:
        return torch.randn(n, h, d, generator=g).to("cuda", torch.bfloat16)

    q, dout = randn(sum(q_lens), hq), randn(sum(q_lens), hq)
    if sliced:  # the first hq heads of tensors twice as wide: token stride 2*hq*d
        q, dout = (_head_slice(x) for x in (q, dout))
    k, v = randn(sum(k_lens), hkv), randn(sum(k_lens), hkv)
    scale = d**-0.5
    results = {}
    for name in ("cudnn", "flash"):
        kernel = get_kernel(name)
        out, lse = kernel.varlen_forward(q, k, v, seg, scale)
        out = _head_slice(out) if sliced else out
        grads = kernel.varlen_backward(dout, q, k, v, out, lse, seg, scale)
        results[name] = (out, lse, *grads)
    for label, got, want, tol in zip(("out", "lse", "dq", "dk", "dv"), results["cudnn"], results["flash"], (1e-2, 1e-3, 3e-2, 3e-2, 3e-2)):
        assert got.shape == want.shape, label
        assert _relative(got, want) < tol, f"{label}: {_relative(got, want):.2e}"


def _gloo_on_one_gpu_worker(rank: int, world_size: int, inputs: dict, positions: torch.Tensor) -> dict:
    """cp = 2 all-gather attention with the cuDNN kernel, both ranks on the one GPU (gloo moves
    the CUDA tensors): the bottom-right segments, the gather plan and the key-gradient return."""
    device_inputs = {name: x.cuda() for name, x in inputs.items()}
    results = {}
    for stride in STRIDES:
        shard = run_shard(device_inputs, positions.cuda(), dist.group.WORLD, rank, world_size, stride, "cudnn")
        results[stride] = {name: x.cpu() for name, x in shard.items()}
    return results


@requires_cuda
@pytest.mark.parametrize("stride", STRIDES)
def test_cudnn_cp2_on_one_gpu_matches_per_document_attention(stride: int) -> None:
    inputs = {name: x.repeat(1, 1, 1, 16) for name, x in bf16_inputs(seed=6).items()}  # head dim 128
    expected = per_document_reference({name: x.float() for name, x in inputs.items()})
    per_rank = run_distributed(_gloo_on_one_gpu_worker, 2, inputs, packed_positions())
    assert_close_bf16([results[stride] for results in per_rank], expected)
