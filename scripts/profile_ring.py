#!/usr/bin/env python
"""Profile titan_cp's ring attention (forward + backward) and split each call's GPU time.

    torchrun --nproc-per-node 2 scripts/profile_ring.py --seq-len 32768 --out-dir prof/

For the ring at S over all ranks and for the same kernel on one GPU at the local length S/cp
(the baseline of the cp efficiency), it records a few steps with `torch.profiler` and splits
the compute stream's time per step into:
- attention: the attention kernels themselves (cuDNN / flash forward and backward);
- other compute: every other kernel and copy off the communication streams (the LSE merge,
  K/V stacking, dQ/dK/dV accumulation, GQA repeats), largest first;
- idle: step time minus the union of compute-stream activity, i.e. time the compute stream
  waits for communication or for the CPU to launch work;
and reports NCCL kernel time (which overlaps compute when the ring hides it). `--gqa` gives the
kernel K/V heads repeated locally to the query heads (`repeat`) and/or as they are (`native`,
for kernels with their own GQA: titan_cp's default for cudnn and flash). Rank 0 writes each profile as a gzipped Chrome trace beside the JSON summary.

`--packed MIX` profiles packed documents instead (bench_attention.py's mixes, e.g. `uniform`:
documents of `--packed-doc-len`): the varlen kernel on one GPU at the full length S (the baseline
of packed efficiency), the all-gather K/V attention (`varlen_llama3`) over all ranks, and Ulysses
over all ranks with the varlen kernel on whole documents.
"""

import argparse
import gzip
import importlib.util
import json
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from titan_cp.context_parallel.kernels import get_kernel, local_attention
from titan_cp.context_parallel.ring_attention import ring_attention
from titan_cp.context_parallel.sharding import shard

ATTENTION_KERNEL = re.compile(r"sdpa|flash|fmha|attn|attention", re.IGNORECASE)
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def _load_bench():
    """bench_attention.py beside this file: the inputs, timing and rank setup are shared."""
    path = Path(__file__).with_name("bench_attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768, help="full sequence length S")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bfloat16")
    p.add_argument("--kernel", default="cudnn", help="titan_cp attention kernel name")
    p.add_argument("--gqa", nargs="+", choices=["repeat", "native"], default=["native"],
                   help="K/V heads repeated locally, or passed to the kernel as they are")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed steps, without the profiler")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="", help="write summary.json and rank 0's traces here")
    p.add_argument("--packed", default="", choices=["", *sorted(bench.PACKED_MIXES)], help="profile packed documents of this mix")
    p.add_argument("--packed-doc-len", type=int, default=8192, help="document length of the uniform and random mixes")
    p.add_argument("--heads-k-stride", type=int, default=0, help="KV heads gathered at a time (0: all)")
    # bench.make_inputs also draws packed-document lengths, which the dense ring never uses; a
    # long mean keeps them to a few documents (make_inputs caps it at a quarter of S).
    p.set_defaults(doc_len=1 << 30)
    return p.parse_args(argv)


def attention_steps(args, inputs, rank: int, world: int, native_gqa: bool) -> dict[str, Callable]:
    """{name: fwd+bwd step} for the single-GPU baseline at S/cp and the ring at S."""
    kernel = get_kernel(args.kernel)
    kernel.native_gqa = native_gqa
    local = args.seq_len // world
    single = bench._leaves(*(t[:, :local] for t in (inputs.q, inputs.k, inputs.v)))
    ring = bench._leaves(*(shard(t, rank, world, "zigzag") for t in (inputs.q, inputs.k, inputs.v)))
    ring_dout = shard(inputs.dout, rank, world, "zigzag")
    group = dist.group.WORLD
    return {
        f"single S={local}": bench._fwd_bwd(lambda q, k, v: local_attention(q, k, v, kernel), *single, inputs.dout[:, :local]),
        f"ring S={args.seq_len} cp={world}": bench._fwd_bwd(
            lambda q, k, v: ring_attention(q, k, v, group, "zigzag", kernel), *ring, ring_dout
        ),
    }


def packed_steps(args, inputs, rank: int, world: int, device: torch.device) -> tuple[dict[str, Callable], float]:
    """({name: fwd+bwd step} of the packed paths, the documents' FLOPs), on `--packed` documents."""
    gen = torch.Generator().manual_seed(args.seed + args.seq_len)
    documents = [bench.PACKED_MIXES[args.packed](args.seq_len, args.packed_doc_len, gen) for _ in range(args.batch)]
    packed = bench.with_documents(inputs, documents)
    steps = {f"single varlen S={args.seq_len}": bench.varlen_method(packed, args.kernel, 0, 1, device, args.heads_k_stride).step}
    if world > 1:
        steps[f"allgather S={args.seq_len} cp={world}"] = bench.varlen_method(
            packed, args.kernel, rank, world, device, args.heads_k_stride
        ).step
        steps[f"ulysses varlen S={args.seq_len} cp={world}"] = bench.ulysses_method(
            packed, args.kernel, rank, world, device, True, args.heads_k_stride
        ).step
    return steps, bench.causal_flops(documents, args.heads, args.head_dim)


def planned_steps(args, inputs, rank: int, world: int, device: torch.device) -> Iterator[tuple[str, str, Callable, float]]:
    """(gqa, name, fwd+bwd step, FLOPs per GPU) of every row, built as they are reached (the
    kernel's GQA setting is shared, so a row's step must run before the next one is built)."""
    if args.packed:
        steps, flops = packed_steps(args, inputs, rank, world, device)
        for name, step in steps.items():
            yield "native", name, step, flops if name.startswith("single") else flops / world
        return
    flops = bench.causal_flops([[args.seq_len]] * args.batch, args.heads, args.head_dim)
    local = bench.causal_flops([[args.seq_len // world]] * args.batch, args.heads, args.head_dim)
    for gqa in args.gqa:
        for name, step in attention_steps(args, inputs, rank, world, gqa == "native").items():
            yield gqa, name, step, flops / world if name.startswith("ring") else local


def profile_step(step: Callable, steps: int, device: torch.device, trace_path: str) -> float:
    """Record `steps` calls of `step` into a Chrome trace; returns the ms per call under the profiler."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
    prof.export_chrome_trace(trace_path)
    return start.elapsed_time(end) / steps


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for begin, finish in sorted(intervals):
        if finish > reach:
            total += finish - max(begin, reach)
            reach = finish
    return total


def split_trace(trace_path: str, steps: int, step_ms: float) -> dict:
    """Per-step GPU time by category from a Chrome trace (see the module docstring)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") in DEVICE_EVENTS and "dur" in e]
    nccl = [e for e in events if "nccl" in e["name"].lower()]
    compute = [e for e in events if "nccl" not in e["name"].lower()]
    attention_us = sum(e["dur"] for e in compute if ATTENTION_KERNEL.search(e["name"]))
    others: dict[str, float] = {}
    for e in compute:
        if not ATTENTION_KERNEL.search(e["name"]):
            others[e["name"]] = others.get(e["name"], 0.0) + e["dur"]
    busy_us = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in compute])
    per_step = lambda us: us / steps / 1e3  # noqa: E731
    top = sorted(others.items(), key=lambda item: -item[1])[:8]
    return {
        "step_ms": step_ms,
        "attention_ms": per_step(attention_us),
        "other_compute_ms": per_step(sum(others.values())),
        "idle_ms": max(0.0, step_ms - per_step(busy_us)),
        "nccl_ms": per_step(sum(e["dur"] for e in nccl)),
        "top_other": [(name[:90], round(per_step(us), 3)) for name, us in top],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = bench.init_distributed("cuda", args.timeout)
    inputs = bench.make_inputs(args, args.seq_len, device)
    scratch = tempfile.mkdtemp(prefix="profile_ring_")
    results = []
    for gqa, name, step, work in planned_steps(args, inputs, rank, world, device):
        bench.barrier(world, device)
        ms = bench.time_step(step, args.warmup, args.iters, device)
        trace = os.path.join(scratch, f"trace_{args.kernel}_{gqa}_{name.split()[0]}_rank{rank}.json")
        bench.barrier(world, device)
        split = split_trace(trace, args.profile_steps, profile_step(step, args.profile_steps, device, trace))
        result = {"kernel": args.kernel, "gqa": gqa, "what": name, "rank": rank, "ms": ms,
                  "tflops_per_gpu": work / (ms * 1e-3) / 1e12, **split}  # fmt: skip
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        results += gathered
        if rank == 0 and args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            with open(trace, "rb") as src, gzip.open(Path(args.out_dir) / (Path(trace).name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        torch.cuda.empty_cache()
    if rank == 0:
        print_summary(args, world, device, results)
        if args.out_dir:
            (Path(args.out_dir) / "summary.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    bench.barrier(world, device)
    dist.destroy_process_group()


def print_summary(args, world: int, device: torch.device, results: list[dict]) -> None:
    print(
        f"ring attention profile: causal {args.dtype}, B={args.batch}, {args.heads} q / {args.kv_heads} KV heads x "
        f"{args.head_dim}, kernel {args.kernel}, {world} x {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    )
    print("| gqa | what | rank | ms (no profiler) | TFLOP/s/GPU | ms under profiler | attention ms | other compute ms | idle ms | NCCL ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['gqa']} | {r['what']} | {r['rank']} | {r['ms']:.2f} | {r['tflops_per_gpu']:.1f} | {r['step_ms']:.2f} "
            f"| {r['attention_ms']:.2f} | {r['other_compute_ms']:.2f} | {r['idle_ms']:.2f} | {r['nccl_ms']:.2f} |"
        )
    for r in results:
        if r["rank"] == 0:
            print(f"\nlargest other compute, {r['gqa']} {r['what']} (ms per step):")
            for name, ms in r["top_other"]:
                print(f"  {ms:7.3f}  {name}")
    for gqa in dict.fromkeys(r["gqa"] for r in results):
        # The slowest rank sets each rate, as in bench_attention.py.
        rates: dict[str, float] = {}
        for r in results:
            if r["gqa"] == gqa:
                rates[r["what"]] = min(rates.get(r["what"], float("inf")), r["tflops_per_gpu"])
        single = next(rate for what, rate in rates.items() if what.startswith("single"))
        for what, rate in rates.items():
            if not what.startswith("single"):
                print(f"\n{gqa}: cp efficiency of {what} (its rate / the single-GPU row's) {rate / single:.3f}")

if __name__ == "__main__":
    main()
