"""Plan context parallelism for a cluster: predicted step time and per-GPU efficiency of the ring,
Ulysses and every hybrid split, and a recommendation.

    python scripts/plan_cp.py --flavor 8B --seq-len 524288 --gpus-per-node 8 --nodes 4
    python scripts/plan_cp.py --calibrate          # predictions against docs/performance.md
    python scripts/plan_cp.py --table              # the tables in docs/scaling.md

The model (docs/scaling.md explains it): per transformer block and GPU, matmuls at the measured
matmul rate, causal attention at the measured kernel rate, a per-token cost for everything
memory-bound and a fixed cost per ring step (both fitted to the measured runs), the ring's
K/V and dK/dV exchanges overlapped with each step's compute (only the excess shows), and the
Ulysses all-to-alls exposed. A layout must fit in memory by titan_cp's own estimate
(titan_cp.memory), with FSDP sharding as the trainer does by default: over one node's GPUs
(parallelism.fsdp_shard_within_node), or over all of them where that alone fits, which the
recommendation then names. FSDP's traffic is assumed hidden behind compute, as measured on 2 GPUs.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from titan_cp.context_parallel.ulysses import kv_copies  # noqa: E402
from titan_cp.memory import GIB, count_params, estimate_memory  # noqa: E402
from titan_cp.metrics import flops_per_token  # noqa: E402
from titan_cp.models.llama3 import llama3_flavors  # noqa: E402
from titan_cp.parallel.parallel_dims import node_local_shard  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 dense bf16, the MFU denominator
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Rates:
    """Measured kernel rates (docs/performance.md) and the three fitted costs."""

    attention_tflops: float = 540.0  # cuDNN causal fwd+bwd, dense, heads of 128; THD varlen 505-547
    attention_tflops_head_dim_64: float = 430.0  # the same with heads of 64 (the 1B): 427-434
    matmul_tflops: float = 769.0
    # Fitted to the 8B 128K end-to-end run (see `calibrate`): memory-bound work per token, block
    # and model dimension (norms, RoPE, SwiGLU's elementwise part, casts, the loss's share) ...
    per_token_dim_s: float = 3.0e-10
    # ... and per ring step of one attention call (launches, LSE merge, cuDNN's per-call kernels),
    # fitted to the three 32K ring rows (0.97, 0.95, 0.93: 0.95 on average) ...
    per_ring_step_s: float = 0.6e-3
    # ... and, fitted to the 32K Ulysses attention row, the rate of the copies that lay q, k, v
    # and the output out for each all-to-all and back (permutes of 5-D tensors, memory-bound).
    ulysses_copy_gbytes: float = 1200.0

    def attention_rate(self, head_dim: int) -> float:
        """cuDNN's attention rate for heads of `head_dim` (measured at 64 and 128)."""
        return self.attention_tflops_head_dim_64 if head_dim <= 64 else self.attention_tflops


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int = 8
    nodes: int = 1
    nvlink_gbytes: float = 450.0  # per GPU and direction
    internode_gbits: float = 400.0  # per GPU (one NIC per GPU)
    link_efficiency: float = 0.8  # fraction of the nominal bandwidth NCCL reaches (assumed)
    gpu_memory_gib: float = 139.0

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def bandwidth(self, crosses_nodes: bool) -> float:
        """Bytes/s one GPU sends to a peer."""
        nominal = self.internode_gbits / 8 * 1e9 if crosses_nodes else self.nvlink_gbytes * 1e9
        return nominal * self.link_efficiency


@dataclass(frozen=True)
class Layout:
    cp: int
    ulysses: int

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def name(self) -> str:
        if self.cp == 1:
            return "no cp"
        if self.ulysses == 1:
            return f"ring {self.cp}"
        if self.ring == 1:
            return f"ulysses {self.cp}"
        return f"ulysses {self.ulysses} x ring {self.ring}"


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    step_s: float
    ideal_s: float  # the same per-GPU work at kernel rates, without any cp communication or cost
    ring_exposed_s: float  # ring transfer time not hidden behind compute, per step
    ulysses_s: float  # all-to-all time per step
    tokens_per_gpu_s: float
    mfu: float
    memory_gib: float
    fits: bool
    fsdp_within_node: bool  # FSDP shards over one node's GPUs (else over all of them)

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.step_s


def _attention_block(args, seq_len: int, layout: Layout, cluster: Cluster, rates: Rates, ac: str):
    """(attention seconds per block and GPU with cp, of which exposed ring transfer, Ulysses)."""
    heads, kv_heads, head_dim = args.n_heads, args.n_kv_heads, args.head_dim
    # Causal fwd+bwd = 7·H·D·S² (forward 2, backward 2.5x forward), spread over cp GPUs.
    compute = 7 * heads * head_dim * seq_len**2 / layout.cp / (rates.attention_rate(head_dim) * 1e12)
    fwd, bwd = compute * 2 / 7, compute * 5 / 7
    exposed_fwd = exposed_bwd = 0.0
    ring = layout.ring
    if ring > 1:
        copies = kv_copies(layout.ulysses, kv_heads)
        kv_bytes = 2 * (seq_len / ring) * (kv_heads * copies / layout.ulysses) * head_dim * BF16
        dkv_bytes = kv_bytes * (1 if ring <= 2 else FP32 / BF16)
        bandwidth = cluster.bandwidth(crosses_nodes=layout.cp > cluster.gpus_per_node)
        step_fwd, step_bwd = fwd / ring, bwd / ring
        t_kv, t_dkv = kv_bytes / bandwidth, dkv_bytes / bandwidth
        # ring - 1 exchanges, each overlapped with one step's compute; the last dK/dV hop (in
        # bf16) has nothing to hide behind.
        exposed_fwd = (ring - 1) * max(0.0, t_kv - step_fwd)
        exposed_bwd = (ring - 1) * max(0.0, t_kv + t_dkv - step_bwd) + t_kv
        fwd += exposed_fwd + ring * rates.per_ring_step_s * 2 / 7
        bwd += exposed_bwd + ring * rates.per_ring_step_s * 5 / 7
    a2a = 0.0
    if layout.ulysses > 1:
        copies = kv_copies(layout.ulysses, kv_heads)
        # q, k, v in and the output back; the same again for the gradients.
        elements = (seq_len / layout.cp) * (2 * heads + 2 * kv_heads * copies) * head_dim
        leaving = elements * BF16 * (layout.ulysses - 1) / layout.ulysses
        # Each element is read and written once before its all-to-all and once after.
        copies_s = 4 * elements * BF16 / (rates.ulysses_copy_gbytes * 1e9)
        a2a = 2 * (leaving / cluster.bandwidth(crosses_nodes=False) + copies_s)
    # Full checkpointing runs the attention forward twice; full_except_attention keeps its output.
    recompute = 1 if ac == "full" else 0
    exposed = exposed_fwd * (1 + recompute) + exposed_bwd
    ulysses = a2a * (1 + recompute / 2)  # a2a is forward + backward alike: recompute repeats half
    return fwd * (1 + recompute) + bwd + ulysses, exposed, ulysses


def predict(
    flavor: str,
    seq_len: int,
    layout: Layout,
    cluster: Cluster,
    rates: Rates,
    ac: str = "full",
    fsdp_within_node: bool = True,
) -> Prediction:
    """Step time of one sequence of `seq_len` tokens on a cp group, per GPU (dp fills the rest).

    dp_shard x cp is every GPU, so FSDP shards over one node's GPUs with `fsdp_within_node`
    (the trainer's default) and over all of them without; only the memory differs."""
    args = llama3_flavors[flavor]
    counts = count_params(args)
    local = seq_len / layout.cp
    matmul = rates.matmul_tflops * 1e12
    # Forward 2, backward 4 FLOPs per parameter and token; checkpointing repeats forward work.
    swiglu_share = 3 * args.dim * args.ffn_hidden_dim / counts.per_block
    recompute = {"full": 2.0, "full_except_attention": 2.0, "selective": 2.0 * swiglu_share, "none": 0.0}[ac]
    block_matmul = (6 + recompute) * counts.per_block * local / matmul
    # The output projection (tied or not), recomputed once by the chunked loss.
    output = 8 * args.vocab_size * args.dim * local / matmul
    per_token = rates.per_token_dim_s * args.dim * local
    attention, exposed, ulysses = _attention_block(args, seq_len, layout, cluster, rates, ac)
    ideal_attention, _, _ = _attention_block(args, seq_len, Layout(1, 1), cluster, rates, ac)
    blocks = args.n_layers
    step = blocks * (block_matmul + attention + per_token) + output
    ideal = blocks * (block_matmul + ideal_attention / layout.cp + per_token) + output
    non_embedding = args.num_params(exclude_embedding=True)
    flops = flops_per_token(non_embedding, blocks, args.n_heads, args.head_dim, seq_len).causal
    fsdp_shard = node_local_shard(cluster.gpus, cluster.gpus_per_node) if fsdp_within_node else cluster.gpus
    memory = estimate_memory(
        args, seq_len=seq_len, local_batch_size=1, fsdp_shard=fsdp_shard, cp=layout.cp, ac_mode=ac,
        param_dtype_bytes=BF16, loss_chunk_size=4096,
    ).total / GIB
    return Prediction(
        layout=layout,
        step_s=step,
        ideal_s=ideal,
        ring_exposed_s=blocks * exposed,
        ulysses_s=blocks * ulysses,
        tokens_per_gpu_s=local / step,
        mfu=flops * local / step / (PEAK_TFLOPS * 1e12),
        memory_gib=memory,
        fits=memory <= cluster.gpu_memory_gib,
        fsdp_within_node=fsdp_within_node,
    )


def predict_placed(
    flavor: str, seq_len: int, layout: Layout, cluster: Cluster, rates: Rates, ac: str = "full"
) -> Prediction:
    """`predict` with FSDP inside a node where that fits, else across all GPUs (where that may)."""
    within = predict(flavor, seq_len, layout, cluster, rates, ac)
    return within if within.fits else predict(flavor, seq_len, layout, cluster, rates, ac, fsdp_within_node=False)


def layouts(cp: int, heads: int, gpus_per_node: int) -> list[Layout]:
    """Ring, Ulysses and every hybrid titan_cp can run for this cp: the Ulysses degree divides cp,
    the query heads and the GPUs per node (a Ulysses group stays inside a node)."""
    return [Layout(cp, u) for u in range(1, cp + 1) if cp % u == 0 and heads % u == 0 and gpus_per_node % u == 0]


def cp_degrees(gpus: int) -> list[int]:
    return [d for d in range(1, gpus + 1) if gpus % d == 0]


def plan(flavor: str, seq_len: int, cluster: Cluster, rates: Rates, cp: int | None = None, ac: str = "full"):
    """(all predictions, the recommended one or None). Without `cp`, every cp degree that divides
    the GPU count is tried and the smallest one that fits is planned (dp takes the rest)."""
    heads = llama3_flavors[flavor].n_heads
    candidates = [cp] if cp else cp_degrees(cluster.gpus)
    for degree in candidates:
        if seq_len % (2 * degree):
            continue
        predictions = [
            predict_placed(flavor, seq_len, layout, cluster, rates, ac)
            for layout in layouts(degree, heads, cluster.gpus_per_node)
        ]
        fitting = [p for p in predictions if p.fits]
        if fitting or cp:
            best = max(fitting, key=lambda p: p.tokens_per_gpu_s) if fitting else None
            return predictions, best
    return [], None


# --- calibration against docs/performance.md ---------------------------------------------------

# (what, flavor, seq_len, cp, activation checkpointing, measured tokens/s per GPU); one H200
# for cp = 1, two for cp = 2.
MEASURED_E2E = [
    ("8B 64K cp=2, selective", "8B", 65536, 2, "selective", 4340.0),
    ("8B 128K cp=2, full", "8B", 131072, 2, "full", 2475.0),
    ("8B 256K cp=2, full", "8B", 262144, 2, "full", 1446.0),
    ("1B 16K 1 GPU, no checkpointing", "1B", 16384, 1, "none", 33508.0),
    ("1B 64K 1 GPU, selective", "1B", 65536, 1, "selective", 17668.0),
    ("1B 16K cp=2 (bf16 parity run), no checkpointing", "1B", 16384, 2, "none", 30090.0),
    ("1B 64K 1 GPU, full_except_attention, compiled", "1B", 65536, 1, "full_except_attention", 18848.0),
    ("1B 128K 1 GPU, full_except_attention, compiled", "1B", 131072, 1, "full_except_attention", 11442.0),
    ("1B 64K 1 GPU, no checkpointing, compiled (run A)", "1B", 65536, 1, "none", 19640.0),
    ("1B 64K 1 GPU, selective, compiled (run A)", "1B", 65536, 1, "selective", 18869.0),
    ("1B 64K 1 GPU, full_except_attention, compiled (run A)", "1B", 65536, 1, "full_except_attention", 18627.0),
    ("1B 128K 1 GPU, selective, compiled (run B)", "1B", 131072, 1, "selective", 11443.0),
    ("1B 128K 1 GPU, full_except_attention, compiled (run B)", "1B", 131072, 1, "full_except_attention", 11333.0),
]
# (what, seq_len, cp, Ulysses degree, measured efficiency against one GPU at the local length):
# attention only, 32 query / 8 KV heads x 128, cuDNN.
MEASURED_ATTENTION = [
    ("ring attention 32K cp=2 (run 2a)", 32768, 2, 1, 0.97),
    ("ring attention 32K cp=2 (run 2b)", 32768, 2, 1, 0.95),
    ("ring attention 128K cp=2", 131072, 2, 1, 0.99),
    ("ring attention 32K cp=2 (2026-11-29)", 32768, 2, 1, 0.93),
    ("ring attention 128K cp=2 (2026-11-29)", 131072, 2, 1, 0.99),
    ("Ulysses attention 32K cp=2 (2026-11-29)", 32768, 2, 2, 0.90),
    ("Ulysses attention 128K cp=2 (2026-11-29)", 131072, 2, 2, 0.96),
]
TWO_H200 = Cluster(gpus_per_node=2, nodes=1)
ONE_H200 = Cluster(gpus_per_node=1, nodes=1)


def attention_efficiency(seq_len: int, layout: Layout, cluster: Cluster, rates: Rates) -> float:
    """One attention call (no checkpointing) over `layout` against the kernel at the local length."""
    args = llama3_flavors["8B"]  # 32 query / 8 KV heads x 128, the benchmark's shape
    with_cp, _, _ = _attention_block(args, seq_len, layout, cluster, rates, "none")
    alone, _, _ = _attention_block(args, seq_len, Layout(1, 1), cluster, rates, "none")
    return alone / layout.cp / with_cp


def calibrate(rates: Rates) -> list[tuple[str, float, float]]:
    """(what, predicted, measured) for every measured figure the model can predict."""
    rows = []
    for what, flavor, seq_len, cp, ac, measured in MEASURED_E2E:
        cluster = TWO_H200 if cp == 2 else ONE_H200
        predicted = predict(flavor, seq_len, Layout(cp, 1), cluster, rates, ac).tokens_per_gpu_s
        rows.append((what + " (tokens/s/GPU)", predicted, measured))
    for what, seq_len, cp, ulysses, measured in MEASURED_ATTENTION:
        predicted = attention_efficiency(seq_len, Layout(cp, ulysses), TWO_H200, rates)
        rows.append((what + " (efficiency)", predicted, measured))
    return rows


# --- output -----------------------------------------------------------------------------------


def _tokens(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def format_plan(flavor: str, seq_len: int, cluster: Cluster, predictions: list[Prediction], best) -> str:
    lines = [
        f"Llama 3 {flavor}, {_tokens(seq_len)} tokens, {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs,"
        f" NVLink {cluster.nvlink_gbytes:g} GB/s, inter-node {cluster.internode_gbits:g} Gb/s",
        "| layout | step s | tokens/s/GPU | efficiency | MFU | ring exposed s | all-to-all s | memory GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in predictions:
        mark = "**" if p is best else ""
        fit = "" if p.fits else " (does not fit)"
        lines.append(
            f"| {mark}{p.layout.name}{mark} | {p.step_s:.2f} | {p.tokens_per_gpu_s:,.0f} | {p.efficiency:.3f} |"
            f" {p.mfu:.1%} | {p.ring_exposed_s:.2f} | {p.ulysses_s:.2f} | {p.memory_gib:.0f}{fit} |"
        )
    if best is None:
        lines.append("no layout fits in memory on these GPUs")
    else:
        dp = cluster.gpus // best.layout.cp
        lines.append(
            f"recommended: cp {best.layout.cp} as {best.layout.name} (ulysses degree {best.layout.ulysses}),"
            f" data parallel {dp}{_fsdp_note(best)}"
        )
    return "\n".join(lines)


def _fsdp_note(prediction: Prediction) -> str:
    return "" if prediction.fsdp_within_node else ", parallelism.fsdp_shard_within_node false"


TABLE_FLAVORS = ("8B", "70B")
TABLE_SEQ_LENS = (131072, 262144, 524288, 1048576)
TABLE_GPUS = (8, 64, 512)


def format_tables(rates: Rates) -> str:
    """docs/scaling.md's tables: the recommended layout per (model, length, GPUs), and one
    sequence over all GPUs (strong scaling) where the ring's hiding breaks down."""
    out = [
        "| model | seq len | GPUs | recommended | cp | tokens/s/GPU | efficiency"
        " | ring alone: efficiency, exposed s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for flavor in TABLE_FLAVORS:
        for seq_len in TABLE_SEQ_LENS:
            for gpus in TABLE_GPUS:
                cluster = Cluster(gpus_per_node=8, nodes=gpus // 8)
                predictions, best = plan(flavor, seq_len, cluster, rates)
                if best is None:
                    out.append(f"| {flavor} | {_tokens(seq_len)} | {gpus} | does not fit | | | | |")
                    continue
                ring = next(p for p in predictions if p.layout.ulysses == 1)
                out.append(
                    f"| {flavor} | {_tokens(seq_len)} | {gpus} | {best.layout.name}{_fsdp_note(best)} | {best.layout.cp} |"
                    f" {best.tokens_per_gpu_s:,.0f} | {best.efficiency:.3f} |"
                    f" {ring.efficiency:.3f}, {ring.ring_exposed_s:.2f} |"
                )
    out += ["", "One sequence over all GPUs (cp = GPUs):", "",
            "| model | seq len | GPUs | tokens per GPU | ring eff. | best hybrid | its eff."
            " | pure Ulysses (8) eff. |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for flavor in TABLE_FLAVORS:
        for seq_len in TABLE_SEQ_LENS:
            for gpus in (8, 16, 32, 64, 128, 256, 512):
                cluster = Cluster(gpus_per_node=8, nodes=gpus // 8)
                predictions, _ = plan(flavor, seq_len, cluster, rates, cp=gpus)
                ring = next(p for p in predictions if p.layout.ulysses == 1)
                best = max(predictions, key=lambda p: p.tokens_per_gpu_s)
                ulysses = [p for p in predictions if p.layout.ring == 1]
                pure = f"{ulysses[0].efficiency:.3f}" if ulysses else "-"
                out.append(
                    f"| {flavor} | {_tokens(seq_len)} | {gpus} | {seq_len // gpus:,} | {ring.efficiency:.3f} |"
                    f" {best.layout.name} | {best.efficiency:.3f} | {pure} |"
                )
    return "\n".join(out)


def ring_hiding_threshold(flavor: str, cluster: Cluster, rates: Rates, crosses_nodes: bool) -> float:
    """Tokens per ring rank above which each ring step's compute covers its transfers.

    Backward is the binding half: 5·H·D·L²/R per step against K/V plus fp32 dK/dV,
    2·L·Hkv·D·(2 + 4) bytes, so L = 12·Hkv·R / (5·H·B).
    """
    args = llama3_flavors[flavor]
    bandwidth = cluster.bandwidth(crosses_nodes)
    return 12 * args.n_kv_heads * rates.attention_rate(args.head_dim) * 1e12 / (5 * args.n_heads * bandwidth)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="8B", choices=sorted(llama3_flavors))
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--cp", type=int, default=0, help="cp degree; 0: the smallest that fits (dp takes the rest)"
    )
    parser.add_argument(
        "--activation-checkpoint", default="full", choices=("none", "selective", "full", "full_except_attention")
    )
    parser.add_argument(
        "--nvlink-gbytes", type=float, default=Cluster.nvlink_gbytes, help="GB/s per GPU and direction"
    )
    parser.add_argument("--internode-gbits", type=float, default=Cluster.internode_gbits, help="Gb/s per GPU")
    parser.add_argument("--link-efficiency", type=float, default=Cluster.link_efficiency)
    parser.add_argument("--gpu-memory-gib", type=float, default=Cluster.gpu_memory_gib)
    parser.add_argument("--attention-tflops", type=float, default=Rates.attention_tflops)
    parser.add_argument("--matmul-tflops", type=float, default=Rates.matmul_tflops)
    parser.add_argument(
        "--calibrate", action="store_true", help="predicted against measured (docs/performance.md)"
    )
    parser.add_argument("--table", action="store_true", help="print docs/scaling.md's tables")
    args = parser.parse_args(argv)
    rates = Rates(attention_tflops=args.attention_tflops, matmul_tflops=args.matmul_tflops)
    if args.calibrate:
        print("| measured figure | predicted | measured |\n|---|---|---|")
        for what, predicted, measured in calibrate(rates):
            digits = 3 if measured < 2 else 0
            print(f"| {what} | {predicted:,.{digits}f} | {measured:,.{digits}f} |")
        return
    if args.table:
        print(format_tables(rates))
        return
    cluster = Cluster(
        gpus_per_node=args.gpus_per_node, nodes=args.nodes, nvlink_gbytes=args.nvlink_gbytes,
        internode_gbits=args.internode_gbits, link_efficiency=args.link_efficiency,
        gpu_memory_gib=args.gpu_memory_gib,
    )  # fmt: skip
    if args.cp and (cluster.gpus % args.cp or args.seq_len % (2 * args.cp)):
        parser.error(f"--cp {args.cp} must divide the {cluster.gpus} GPUs and --seq-len / 2")
    predictions, best = plan(
        args.flavor, args.seq_len, cluster, rates, args.cp or None, args.activation_checkpoint
    )
    print(format_plan(args.flavor, args.seq_len, cluster, predictions, best))
    for crosses, where in ((False, "NVLink"), (True, "inter-node")):
        threshold = ring_hiding_threshold(args.flavor, cluster, rates, crosses)
        print(f"ring hides its transfers over {where} from {threshold:,.0f} tokens per ring rank")


if __name__ == "__main__":
    main()
