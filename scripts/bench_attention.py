#!/usr/bin/env python
"""Time causal attention forward + backward: single-device kernels, titan_cp's context-parallel
attention, and PyTorch's native `context_parallel`, on the same shapes in one run.

    torchrun --nproc-per-node 2 scripts/bench_attention.py --seqlens 32768 131072 --out bench.json

Rows, for every sequence length S (cp = number of ranks):
- single: each local kernel on one device, at S and at the local length S/cp (the baseline of
  the cp efficiency);
- batch_ring: titan_cp's p2p ring in the zigzag layout, with each kernel;
- varlen_llama3: titan_cp's packed-document attention (one varlen call at cp = 1, all-gather K/V
  with documents sharded zigzag over all ranks), with each kernel, for each --packed-mixes mix:
  random (lengths uniform on [1, 2*--doc-len)), uniform (documents of --doc-len), mixed
  (256 to 16K tokens) and long (one document of S);
- cudnn_thd: nvidia-cudnn-frontend's own differentiable `cudnn.sdpa_torch` on the same packed
  documents at cp = 1, the raw cuDNN THD rate titan_cp's cudnn varlen rows are measured against
  (their efficiency column); an n/a row where the package is not installed;
- ulysses, ulysses_varlen: titan_cp's Ulysses all-to-all over all ranks around the local causal
  kernel (dense) and the local varlen kernel (each packed mix), when the ranks divide the query
  heads;
- native_cp: `torch.distributed.tensor.experimental.context_parallel` around
  `F.scaled_dot_product_attention(is_causal=True)`, its head-tail load balancer (the zigzag
  layout), for each rotate method, with SDPA pinned to cuDNN or flash by `sdpa_kernel`.

FLOPs (printed with the table): causal forward = 2 matmuls x 2 FLOPs x B*H*S*S*D / 2, backward
= 2.5 x forward, so fwd + bwd = 3.5 x forward = 7*B*H*D*S^2; packed documents count
sum(L_doc^2) in place of S^2 (only the query-key pairs documents really compute). TFLOP/s per GPU = FLOPs / cp / time; cp efficiency = that rate /
the single-device rate of the same kernel at S/cp. Every CP row is first checked once against
a single-device reference (PyTorch SDPA on the full sequence, per document when packed) and the
max error printed. Every row is timed in --rounds rounds that interleave the rows (per round the
median of --iters steps on the slowest rank) and reported as the median over the rounds, so a
drift of the GPU clocks cannot favour one row. A row that cannot run says why ("n/a (...)", "OOM") instead of stopping the
run; a failure on one rank in the middle of a collective can still stall the others until
--timeout.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titan_cp.context_parallel.document_sharding import packed_shards
from titan_cp.context_parallel.kernels import get_kernel, local_attention, resolve_attn_implementation
from titan_cp.context_parallel.ring_attention import ring_attention
from titan_cp.context_parallel.sharding import shard, unshard
from titan_cp.context_parallel.ulysses import ulysses_attention
from titan_cp.context_parallel.varlen_attention import document_cu_seqlens, varlen_llama3_attention

FLOPS_FORMULA = (
    "causal fwd = 4*B*H*D*S^2/2, bwd = 2.5*fwd, fwd+bwd = 3.5*fwd = 7*B*H*D*S^2 "
    "(packed documents: sum of L_doc^2 for S^2); TFLOP/s per GPU = FLOPs / cp / time"
)
# What the native rows pin SDPA to, per kernel name; titan_cp's 'sdpa_cpu' is the CPU flash op.
NATIVE_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cpu": SDPBackend.FLASH_ATTENTION,
}
# Max error relative to the reference's largest magnitude, per dtype: above it the check fails.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Row:
    method: str
    kernel: str
    seq_len: int
    cp: int
    docs: str = ""  # the packed-document mix of varlen_llama3 / cudnn_thd rows
    ms: Optional[float] = None  # median over rounds of `times`
    times: list[float] = field(default_factory=list)  # per round: the slowest rank's median ms
    tflops_per_gpu: Optional[float] = None
    efficiency: Optional[float] = None
    check: str = ""  # "ok <err>" / "FAIL <err>" / "" when not checked
    status: str = "ok"  # "ok", "n/a (reason)" or "OOM"
    notes: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """The full-length tensors every rank builds identically, and their packed documents."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    positions: torch.Tensor  # document positions for the packed rows, [B, S]
    doc_lengths: list[list[int]]  # per sample


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072], help="full sequence lengths S")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--kernels", nargs="+", default=None,
                   help="default: cudnn flash (and flash_attn if installed) on CUDA, sdpa_cpu on CPU")  # fmt: skip
    p.add_argument("--doc-len", type=int, default=8192, help="document length of the random and uniform mixes")
    p.add_argument("--packed-mixes", nargs="+", default=["random"], choices=sorted(PACKED_MIXES),
                   help="document-length mixes of the packed rows (see the docstring)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="which kinds of rows to run")
    p.add_argument(
        "--heads-k-stride", type=int, default=0, help="KV heads gathered at a time by varlen_llama3 (0: all at once)"
    )
    p.add_argument("--native-rotate", nargs="+", default=["allgather", "alltoall"], choices=["allgather", "alltoall"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3,
                   help="time every row this many times, interleaved with the other rows; report the median")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check every CP method once against the single-device reference")  # fmt: skip
    p.add_argument("--timeout", type=int, default=600, help="process-group timeout in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the rows as JSON here")
    return p.parse_args(argv)


# --- setup ------------------------------------------------------------------------------------


def init_distributed(device_type: str, timeout_s: int) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Without torchrun this is a group of one, so that every
    method (the ring, native CP's device mesh) runs unchanged at cp = 1."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device_type == "cuda" else None,
        )
    return rank, world, device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def document_lengths(seq_len: int, mean: int, generator: torch.Generator) -> list[int]:
    """Random document lengths (uniform on [1, 2*mean - 1]) filling `seq_len`; the last is cut."""
    mean = max(1, min(mean, seq_len // 4))
    return _fill(seq_len, lambda: int(torch.randint(1, 2 * mean, (1,), generator=generator)))


def _fill(seq_len: int, draw: Callable[[], int]) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < seq_len:
        lengths.append(draw())
    lengths[-1] -= sum(lengths) - seq_len
    return lengths


PACKED_MIXES: dict[str, Callable[[int, int, torch.Generator], list[int]]] = {
    "random": lambda seq_len, doc_len, gen: document_lengths(seq_len, doc_len, gen),
    "uniform": lambda seq_len, doc_len, gen: _fill(seq_len, lambda: min(doc_len, seq_len)),
    "mixed": lambda seq_len, doc_len, gen: _fill(seq_len, lambda: int(torch.randint(256, 16385, (1,), generator=gen))),
    "long": lambda seq_len, doc_len, gen: [seq_len],
}
METHODS = ["single", "batch_ring", "varlen_llama3", "cudnn_thd", "ulysses", "native_cp"]


def with_documents(inputs: Inputs, doc_lengths: list[list[int]]) -> Inputs:
    """The same tensors, packed as the given documents (per sample)."""
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in doc_lengths])
    return Inputs(inputs.q, inputs.k, inputs.v, inputs.dout, positions.to(inputs.q.device), doc_lengths)


def make_inputs(args: argparse.Namespace, seq_len: int, device: torch.device) -> Inputs:
    """Identical on every rank: seeded generators, one per sequence length; one document per
    sample (the packed rows re-cut them with `with_documents`)."""
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(args.seed + seq_len)

    def randn(heads: int) -> torch.Tensor:
        shape = (args.batch, seq_len, heads, args.head_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v, dout = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads)
    positions = torch.arange(seq_len, device=device).expand(args.batch, seq_len)
    return Inputs(q, k, v, dout, positions, [[seq_len] for _ in range(args.batch)])


def default_kernels(device: torch.device) -> list[str]:
    """cuDNN and flash on CUDA, plus the flash-attn package's FA2 where it is installed."""
    if device.type != "cuda":
        return ["sdpa_cpu"]
    return ["cudnn", "flash"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])


# --- FLOPs and timing -------------------------------------------------------------------------


def causal_flops(doc_lengths: list[list[int]], heads: int, head_dim: int) -> float:
    """Forward + backward FLOPs of causal attention over the given documents (see the docstring)."""
    forward = sum(4 * heads * head_dim * n * n / 2 for lengths in doc_lengths for n in lengths)
    return 3.5 * forward


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(world: int, device: torch.device) -> None:
    synchronize(device)
    if world > 1:
        dist.barrier()


def time_step(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of `step` after `warmup` calls (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --- the reference and the check --------------------------------------------------------------


def sdpa_reference(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) of PyTorch SDPA, causal within each document, KV heads repeated."""
    q, k, v = (t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    group = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    outs = []
    for b, lengths in enumerate(inputs.doc_lengths):
        start = 0
        for n in lengths:
            rows = slice(start, start + n)
            o = F.scaled_dot_product_attention(
                q[b : b + 1, rows].transpose(1, 2), kr[b : b + 1, rows].transpose(1, 2),
                vr[b : b + 1, rows].transpose(1, 2), is_causal=True,
            )  # fmt: skip
            outs.append((b, rows, o.transpose(1, 2)))
            start += n
    out = torch.empty_like(q)
    for b, rows, o in outs:
        out[b : b + 1, rows] = o
    grads = torch.autograd.grad(out, (q, k, v), inputs.dout)
    return (out.detach(), *grads)


def dense_inputs(inputs: Inputs) -> Inputs:
    """The same tensors as one document per sample (plain causal attention)."""
    seq_len = inputs.q.shape[1]
    positions = torch.arange(seq_len, device=inputs.q.device).expand(inputs.q.shape[0], seq_len)
    return Inputs(inputs.q, inputs.k, inputs.v, inputs.dout, positions, [[seq_len] for _ in inputs.doc_lengths])


def gather_full(local: torch.Tensor, world: int, layout) -> torch.Tensor:
    """The full-length tensor from every rank's shard `local` [B, S/cp, ...] in `layout` (a
    sharding.py layout name, or a function that unshards the list of every rank's shard)."""
    if world == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous())
    return layout(shards) if callable(layout) else unshard(shards, layout)


def compare(results: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...], dtype: torch.dtype) -> str:
    """'ok <err>' or 'FAIL <err>': the worst of out/dq/dk/dv, relative to each one's max |ref|."""
    errors = [
        ((r.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
        for r, ref in zip(results, reference)
    ]
    worst = max(errors)
    verdict = "ok" if worst <= CHECK_TOLERANCE[dtype] else "FAIL"
    return f"{verdict} {worst:.1e} (out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errors)})"


# --- the methods: each returns a fwd+bwd step over local tensors and how to reassemble them -------


@dataclass
class Method:
    """A fwd+bwd `step` returning local (out, dq, dk, dv), the layout of those shards, and notes."""

    step: Callable[[], tuple[torch.Tensor, ...]]
    layout: object  # a sharding.py layout name, or a function of every rank's shards (gather_full)
    notes: list[str] = field(default_factory=list)
    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _fwd_bwd(attend: Callable, q, k, v, dout) -> Callable[[], tuple[torch.Tensor, ...]]:
    def step():
        out = attend(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    return step


def single_method(inputs: Inputs, kernel_name: str, length: int, device: torch.device) -> Method:
    resolve_attn_implementation(kernel_name, device)
    kernel = get_kernel(kernel_name)
    q, k, v = _leaves(*(t[:, :length] for t in (inputs.q, inputs.k, inputs.v)))
    return Method(_fwd_bwd(lambda q, k, v: local_attention(q, k, v, kernel), q, k, v, inputs.dout[:, :length]), "contiguous")


def ring_method(inputs: Inputs, kernel_name: str, rank: int, world: int, device: torch.device) -> Method:
    resolve_attn_implementation(kernel_name, device)
    kernel = get_kernel(kernel_name)
    q, k, v, dout = (shard(t, rank, world, "zigzag") for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    q, k, v = _leaves(q, k, v)
    group = dist.group.WORLD

    def attend(q, k, v):
        return ring_attention(q, k, v, group, "zigzag", kernel)

    return Method(_fwd_bwd(attend, q, k, v, dout), "zigzag")


def varlen_method(inputs: Inputs, kernel_name: str, rank: int, world: int, device: torch.device, stride: int) -> Method:
    resolve_attn_implementation(kernel_name, device)
    kernel = get_kernel(kernel_name)
    batch, seq_len = inputs.positions.shape
    # As ContextParallel shards a packed batch: zigzag within documents (contiguous for flash_attn).
    layout = "contiguous" if kernel_name == "flash_attn" else "zigzag"
    shards = packed_shards(document_cu_seqlens(inputs.positions).tolist(), batch, seq_len, world, layout)
    q, k, v, dout = (shards.shard(t, rank) for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    q, k, v = _leaves(q, k, v)
    group = dist.group.WORLD if world > 1 else None

    def attend(q, k, v):
        return varlen_llama3_attention(q, k, v, shards, group, stride, kernel)

    return Method(_fwd_bwd(attend, q, k, v, dout), shards.unshard, [kernel.varlen_name])


def cudnn_thd_method(inputs: Inputs, device: torch.device) -> Method:
    """nvidia-cudnn-frontend's own autograd op on the packed documents: the raw kernel rate."""
    import cudnn  # the [cudnn] extra; an ImportError makes this an n/a row

    sdpa = cudnn.sdpa_torch
    cu_seqlens = document_cu_seqlens(inputs.positions).to(device)
    longest = max(n for lengths in inputs.doc_lengths for n in lengths)
    q, k, v = _leaves(*(t.flatten(0, 1) for t in (inputs.q, inputs.k, inputs.v)))
    shape = inputs.q.shape

    def attend(q, k, v):
        out, _ = sdpa(q, k, v, is_causal=True, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                      max_seqlen_q=longest, max_seqlen_kv=longest, return_lse=True)  # fmt: skip
        return out

    step = _fwd_bwd(attend, q, k, v, inputs.dout.flatten(0, 1))

    def unflattened():
        out, dq, dk, dv = step()
        return out.view(shape), dq.view(shape), dk.view(inputs.k.shape), dv.view(inputs.k.shape)

    return Method(unflattened, "contiguous", ["cudnn.sdpa_torch, causal top-left"])


def ulysses_method(inputs: Inputs, kernel_name: str, rank: int, world: int, device: torch.device, packed: bool, stride: int) -> Method:
    """Pure Ulysses over all ranks (contiguous shards): the local kernel on whole sequences, or the
    local varlen kernel on whole documents, for 1/world of the heads."""
    resolve_attn_implementation(kernel_name, device)
    kernel = get_kernel(kernel_name)
    batch, seq_len = inputs.positions.shape
    whole = packed_shards(document_cu_seqlens(inputs.positions).tolist(), batch, seq_len, 1, "contiguous")
    q, k, v, dout = (shard(t, rank, world, "contiguous") for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    q, k, v = _leaves(q, k, v)

    def inner(q, k, v):
        if packed:
            return varlen_llama3_attention(q, k, v, whole, None, stride, kernel)
        return local_attention(q, k, v, kernel)

    def attend(q, k, v):
        return ulysses_attention(q, k, v, dist.group.WORLD, inner)

    return Method(_fwd_bwd(attend, q, k, v, dout), "contiguous")


def ulysses_plan(dense: Inputs, packed: dict[str, Inputs], kernels: list[str], rank: int, world: int,
                 device: torch.device, args: argparse.Namespace, reference: Callable, flops: dict) -> list:
    """The Ulysses rows of one sequence length: dense and each packed mix, with each kernel."""
    if world == 1 or args.heads % world:
        return []
    seq_len = dense.q.shape[1]
    flops[("ulysses", seq_len, "")] = flops[("single", seq_len, "")]
    sources = [("ulysses", "", dense)] + [("ulysses_varlen", mix, source) for mix, source in packed.items()]
    plan = []
    for method, mix, source in sources:
        if mix:
            flops[(method, seq_len, mix)] = flops[("varlen_llama3", seq_len, mix)]
        for kernel in kernels:
            plan.append((
                Row(method, kernel, seq_len, world, mix),
                lambda k=kernel, p=bool(mix), i=source: ulysses_method(i, k, rank, world, device, p, args.heads_k_stride),
                reference(mix or "dense", source),
            ))  # fmt: skip
    return plan


def native_needs_cuda() -> Method:
    # Not attempted on CPU: torch's native CP has no sharding rule for the CPU attention op, and
    # a failed attempt leaves its process groups half used, which can abort the process at exit.
    raise NotImplementedError("native context_parallel has no CPU attention kernel (needs CUDA SDPA backends)")


def native_method(inputs: Inputs, kernel_name: str, rotate: str, world: int, device: torch.device) -> Method:
    """PyTorch's context_parallel: shards [B, H, S, D] buffers head-tail, patches SDPA."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    # set_rotate_method is documented as the way to choose the KV rotation, but torch exports it
    # only from this private module; an ImportError here becomes an n/a row.
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    backend = NATIVE_BACKENDS[kernel_name]
    set_rotate_method(rotate)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    notes: list[str] = []
    q, k, v, dout = (t.transpose(1, 2).contiguous() for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
    group = q.shape[1] // k.shape[1]
    # The native ring calls the fused ops with the KV heads it is given; whether they accept
    # fewer KV heads (enable_gqa) depends on the op and the torch release, so probe it once.
    gqa = group > 1 and _native_gqa_works(mesh, backend, q, k, v, dout)
    if group > 1 and not gqa:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        notes.append("KV heads repeated (enable_gqa failed under native CP)")
    elif gqa:
        notes.append("enable_gqa")
    context = contextlib.ExitStack()
    try:
        context.enter_context(sdpa_kernel(backend))
        # Shards the buffers in place (head-tail = zigzag, as S % (2*cp) == 0) and patches SDPA.
        context.enter_context(context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]))
        leaves = _leaves(q, k, v)
    except BaseException:
        context.close()
        raise

    def attend(q, k, v):
        kwargs = {"enable_gqa": True} if gqa else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)

    fwd_bwd = _fwd_bwd(attend, *leaves, dout)

    def step():
        out, dq, dk, dv = fwd_bwd()
        if not gqa and group > 1:
            dk, dv = (d.unflatten(1, (-1, group)).sum(2) for d in (dk, dv))
        return tuple(t.transpose(1, 2) for t in (out, dq, dk, dv))

    return Method(step, "zigzag", notes, context)


def _native_gqa_works(mesh, backend, q, k, v, dout) -> bool:
    from torch.distributed.tensor.experimental import context_parallel

    buffers = [t.clone() for t in (q, k, v, dout)]
    try:
        with sdpa_kernel(backend), context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
            leaves = _leaves(*buffers[:3])
            out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
            torch.autograd.grad(out, leaves, buffers[3])
        ok = 1
    except (RuntimeError, NotImplementedError, ValueError, AssertionError):
        ok = 0
    flag = torch.tensor([ok], device=q.device)
    if mesh.size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# --- running rows -----------------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def run_row(
    row: Row,
    build: Callable[[], Method],
    args: argparse.Namespace,
    world: int,
    device: torch.device,
    reference: Optional[Callable[[], tuple[torch.Tensor, ...]]],
) -> Row:
    """Build, check (when given a reference), then time one round of `row`; all ranks agree on
    its outcome. A row that failed in an earlier round is not run again."""
    if row.status != "ok":
        return row
    barrier(world, device)
    ms = math.nan
    try:
        method = build()
        row.notes += [note for note in method.notes if note not in row.notes]
        with method.context:
            if reference is not None:
                results = tuple(gather_full(t, row.cp, method.layout) for t in method.step())
                row.check = compare(results, reference(), DTYPES[args.dtype])
                del results
            ms = time_step(method.step, args.warmup, args.iters, device)
    except torch.OutOfMemoryError:
        row.status = "OOM"
    except Exception as error:  # an unavailable kernel or unsupported shape: report and go on
        row.status = f"n/a ({_reason(error)})"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _agree(row, ms, world)


def _agree(row: Row, ms: float, world: int) -> Row:
    """The slowest rank's time and the first failure any rank saw."""
    outcomes = [(row.status, ms, row.check)]
    if world > 1:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, (row.status, ms, row.check))
    failed = [status for status, _, _ in outcomes if status != "ok"]
    if failed:
        row.status = failed[0]
        return row
    row.check = next((check for _, _, check in outcomes if check.startswith("FAIL")), row.check)
    row.times.append(max(t for _, t, _ in outcomes))
    row.ms = statistics.median(row.times)
    return row


def add_rates(rows: list[Row], flops: dict[tuple[str, int, str], float]) -> None:
    """TFLOP/s per GPU, and each cp row's efficiency against its kernel's single row at S/cp."""
    single = {}
    for row in rows:
        if row.ms is None:
            continue
        row.tflops_per_gpu = flops[(row.method, row.seq_len, row.docs)] / row.cp / (row.ms * 1e-3) / 1e12
        if row.method == "single":
            single[(row.kernel, row.seq_len)] = row.tflops_per_gpu
    packed = {(r.method, r.kernel, r.seq_len, r.docs): r.tflops_per_gpu for r in rows if r.cp == 1 and r.docs}
    for row in rows:
        if row.docs:
            # Packed rows: cp > 1 against the same kernel at cp = 1 on the whole batch; cudnn at
            # cp = 1 against the raw cuDNN THD op on the same documents.
            if row.cp > 1:
                base = packed.get(("varlen_llama3", row.kernel, row.seq_len, row.docs))
            elif row.method == "varlen_llama3" and row.kernel == "cudnn":
                base = packed.get(("cudnn_thd", "cudnn", row.seq_len, row.docs))
            else:
                base = None
        else:
            base = single.get((row.kernel, row.seq_len // row.cp))
        if row.method != "single" and row.tflops_per_gpu is not None and base:
            row.efficiency = row.tflops_per_gpu / base


def benchmark(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[Row]:
    kernels = args.kernels or default_kernels(device)
    rows: list[Row] = []
    flops: dict[tuple[str, int, str], float] = {}
    for seq_len in args.seqlens:
        if seq_len % (2 * world):
            raise SystemExit(f"--seqlens {seq_len} must be divisible by 2 * ranks = {2 * world} (zigzag layout)")
        inputs = make_inputs(args, seq_len, device)
        dense = dense_inputs(inputs)
        packed = {}
        for mix in args.packed_mixes:
            gen = torch.Generator().manual_seed(args.seed + seq_len + len(mix))
            packed[mix] = with_documents(inputs, [PACKED_MIXES[mix](seq_len, args.doc_len, gen) for _ in range(args.batch)])
        cache: dict[str, tuple[torch.Tensor, ...]] = {}

        def reference(which: str, source: Inputs) -> Optional[Callable[[], tuple[torch.Tensor, ...]]]:
            if not args.check:
                return None

            def get():
                if which not in cache:
                    cache.clear()  # one reference at a time: they are full-size tensors
                    cache[which] = sdpa_reference(source)
                return cache[which]

            return get

        lengths = sorted({seq_len, seq_len // world}, reverse=True)
        for length in lengths:
            flops[("single", length, "")] = causal_flops([[length]] * args.batch, args.heads, args.head_dim)
        flops[("batch_ring", seq_len, "")] = flops[("single", seq_len, "")]
        for mix, source in packed.items():
            flops[("varlen_llama3", seq_len, mix)] = flops[("cudnn_thd", seq_len, mix)] = causal_flops(
                source.doc_lengths, args.heads, args.head_dim
            )
        for rotate in args.native_rotate:
            flops[(f"native_cp/{rotate}", seq_len, "")] = flops[("single", seq_len, "")]

        plan: list[tuple[Row, Callable[[], Method], Optional[Callable]]] = []
        if "single" in args.methods:
            for kernel in kernels:
                for length in lengths:
                    # Checked against the reference at full length only (the local one is a prefix).
                    check = reference("dense", dense) if length == seq_len else None
                    plan.append((Row("single", kernel, length, 1), lambda k=kernel, n=length: single_method(inputs, k, n, device), check))
        if "batch_ring" in args.methods:
            for kernel in kernels:
                plan.append((Row("batch_ring", kernel, seq_len, world), lambda k=kernel: ring_method(inputs, k, rank, world, device), reference("dense", dense)))
        for mix, source in packed.items():
            if "cudnn_thd" in args.methods and "cudnn" in kernels:
                plan.append((Row("cudnn_thd", "cudnn", seq_len, 1, mix), lambda s=source: cudnn_thd_method(s, device), reference(mix, source)))
            if "varlen_llama3" in args.methods:
                for kernel in kernels:
                    for cp in sorted({1, world}):
                        plan.append((
                            Row("varlen_llama3", kernel, seq_len, cp, mix),
                            lambda k=kernel, c=cp, s=source: varlen_method(s, k, rank if c > 1 else 0, c, device, args.heads_k_stride),
                            reference(mix, source),
                        ))  # fmt: skip
        if "ulysses" in args.methods:
            plan += ulysses_plan(dense, packed, kernels, rank, world, device, args, reference, flops)
        if "native_cp" in args.methods:
            for rotate in args.native_rotate:
                # Native CP runs SDPA's own backends only: flash_attn has no row there.
                for kernel in (k for k in kernels if k in NATIVE_BACKENDS):
                    plan.append((
                        Row(f"native_cp/{rotate}", kernel, seq_len, world),
                        (lambda k=kernel, r=rotate: native_method(inputs, k, r, world, device))
                        if device.type == "cuda" else native_needs_cuda,
                        reference("dense", dense),
                    ))  # fmt: skip

        # Rounds interleave the rows, so a drift of the GPU clocks shows in every row alike
        # rather than in whichever row ran while it lasted; each row is checked in round 1 only.
        for round_index in range(args.rounds):
            for row, build, check in plan:
                run_row(row, build, args, world, device, check if round_index == 0 else None)
                if rank == 0:
                    done = f"{row.times[-1]:.2f} ms" if row.status == "ok" else row.status
                    docs = f" docs={row.docs}" if row.docs else ""
                    where = f"{row.method} {row.kernel} S={row.seq_len} cp={row.cp}{docs} round {round_index + 1}"
                    print(f"[bench] {where}: {done} {row.check if round_index == 0 else ''}", flush=True)
        rows += [row for row, _, _ in plan]
        del inputs, dense, packed, cache
    add_rates(rows, flops)
    return rows


# --- output -----------------------------------------------------------------------------------

HEADER = "| method | kernel | S | cp | docs | ms | TFLOP/s per GPU | efficiency | check | notes |"


def format_row(row: Row) -> str:
    def num(x: Optional[float], fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    # A '|' inside an error message would split the markdown cell.
    ms = num(row.ms, ".2f") if row.status == "ok" else row.status.replace("|", "/")
    notes = "; ".join(row.notes)
    return (
        f"| {row.method} | {row.kernel} | {row.seq_len} | {row.cp} | {row.docs or '-'} | {ms} | {num(row.tflops_per_gpu, '.4g')} "
        f"| {num(row.efficiency, '.2f')} | {row.check or '-'} | {notes} |"
    )


def markdown_table(rows: list[Row]) -> str:
    return "\n".join([HEADER, "|" + "---|" * HEADER.count(" | ") + "---|", *(format_row(r) for r in rows)])


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device, args.timeout)
    if rank == 0:
        print(
            f"attention fwd+bwd, causal, {args.dtype}, B={args.batch}, {args.heads} q / {args.kv_heads} KV heads "
            f"x {args.head_dim}, {world} rank(s) on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
            f"torch {torch.__version__}\nFLOPs: {FLOPS_FORMULA}",
            flush=True,
        )
    rows = benchmark(args, rank, world, device)
    if rank == 0:
        print(markdown_table(rows), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "flops_formula": FLOPS_FORMULA,
                        "world_size": world,
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__,
                        "args": vars(args),
                        "rows": [asdict(r) for r in rows],
                    },
                    f,
                    indent=1,
                )
    if dist.is_initialized():
        barrier(world, device)  # no rank tears its groups down while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
