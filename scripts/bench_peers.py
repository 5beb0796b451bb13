#!/usr/bin/env python
"""titan_cp against torchtitan and Hugging Face transformers, back to back: one table.

    python scripts/bench_peers.py --suite peers --out-dir outputs/peers     # 64K and 128K, one GPU
    python scripts/bench_peers.py --suite float8 --out-dir outputs/float8   # bf16 vs Float8, 100 steps
    python scripts/bench_peers.py --flavor 8B --cp 2 --out-dir outputs/cp2  # each sequence on 2 GPUs

Every row trains the same Llama 3 flavor (1B: Llama 3.2 shapes) on one sequence per step, bf16
compute, on the same jsonl of documents (written once from the shipped corpus; HF trains on
synthetic tokens, which its rate does not depend on). Rows run one after the other, each in
its own processes with its own timeout; rows are skipped once `--deadline` seconds have passed,
so the whole benchmark ends in a known time. The table goes to stdout and to `peers.md`; every
row, with its command, to `peers.json` (scripts/plot_peers.py draws the chart from it).
Tokens/s: the median over steps `--first-timed-step` and later; MFU from tokens/s with both of
titan_cp's FLOP formulas (titan_cp.metrics: causal, and torchtitan's, which ignores the causal
half), against the 989 TFLOP/s dense bf16 peak; peak memory is the peak allocated by PyTorch.
"""

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for path in (str(REPO), str(SCRIPTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_torchtitan_peer as torchtitan_peer  # noqa: E402
from titan_cp.data.records import iter_records  # noqa: E402
from titan_cp.metrics import PEAK_BF16_FLOPS, flops_per_token  # noqa: E402
from titan_cp.models.llama3.args import llama3_flavors  # noqa: E402

K = 1024


def seq_name(seq_len: int) -> str:
    """65536 -> "64K"; lengths that are not whole K stay numbers."""
    return f"{seq_len // K}K" if seq_len % K == 0 else str(seq_len)


@dataclass
class Row:
    """One benchmark run: a trainer, its setting, and the command-line options that make it."""

    trainer: str  # titan_cp, torchtitan or hf
    seq_len: int
    setting: str
    options: list[str] = field(default_factory=list)
    steps: int = 6
    timeout: float = 300

    @property
    def label(self) -> str:
        return f"{self.trainer}_{seq_name(self.seq_len)}_{self.setting}".replace(" ", "_")


def torchtitan_best_ac(seq_len: int) -> str:
    """torchtitan's fastest setting that fits one H200 (issue measurements): per-op selective
    AC up to 64K, full AC beyond (per-op selective runs out of memory at 128K)."""
    return "selective_op" if seq_len <= 64 * K else "full"


def peer_rows(
    seq_lens: list[int],
    steps: int,
    titan_cp_ac: list[str] = ("default",),
    cp: int = 1,
    torchtitan_ac: list[str] = (),
) -> list[Row]:
    """The comparison table: titan_cp compiled (the CUDA default) with each AC mode of
    `titan_cp_ac` ("default": the config's own), torchtitan with each of `torchtitan_ac` (empty:
    its best setting on one H200), HF with gradient checkpointing and Liger's fused loss.

    `cp` > 1 splits each sequence over that many GPUs, titan_cp and torchtitan each with its own
    context parallelism; HF has none, so it has no rows then.
    """
    split = ["--parallelism.context_parallel_degree", str(cp)] if cp > 1 else []
    torchtitan_split = ["--cp", str(cp)] if cp > 1 else []
    rows = []
    for seq in seq_lens:
        for mode in titan_cp_ac:
            options = [] if mode == "default" else ["--activation_checkpoint.mode", mode]
            rows.append(Row("titan_cp", seq, mode, options + split, steps))
        for ac in torchtitan_ac or [torchtitan_best_ac(seq)]:
            rows.append(Row("torchtitan", seq, f"{ac} compiled", ["--ac", ac, *torchtitan_split], steps))
    if cp == 1:
        for seq in seq_lens:
            rows.append(Row("hf", seq, "checkpointing liger", ["--activation-checkpointing", "--liger"], max(2, steps - 3)))
    return rows


def float8_rows(seq_len: int, steps: int) -> list[Row]:
    """bf16 against Float8 linears on titan_cp, same seed and data: speed and loss parity; Float8
    as the default (every linear), then with the output projection kept bf16 (torchtitan's default)."""
    base = ["--activation_checkpoint.mode", "none", "--lr_scheduler.warmup_steps", "10"]
    float8 = [*base, "--model.converters", "float8"]
    return [
        Row("titan_cp", seq_len, "bf16", base, steps, timeout=240),
        Row("titan_cp", seq_len, "float8", float8, steps, timeout=240),
        Row(
            "titan_cp", seq_len, "float8_output_bf16", [*float8, "--float8.filter_fqns", "output"], steps, timeout=240
        ),
    ]


def write_dataset(corpus: Path, out: Path) -> Path:
    """The shipped corpus as a jsonl of {"text": document}, for both titan_cp and torchtitan."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for record in iter_records(corpus):
            f.write(json.dumps({"text": record.data["text"]}) + "\n")
    return out


def row_command(
    row: Row, flavor: str, data: Path, out_dir: Path, first_timed_step: int, local_batch_size: int = 1
) -> list[str]:
    """The command that runs `row` (from the repository root); `local_batch_size` sequences per
    titan_cp step (the peers take one)."""
    work = out_dir / row.label
    if row.trainer == "titan_cp":
        return [
            "./scripts/run_train.sh", "train_configs/debug_model.toml", "--model.flavor", flavor,
            "--training.seq_len", str(row.seq_len), "--training.local_batch_size", str(local_batch_size),
            "--training.steps", str(row.steps), "--training.dataset_path", str(data),
            "--optimizer.lr", "3e-4", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
            "--checkpoint.enable", "false", "--job.dump_folder", str(work), *row.options,
        ]  # fmt: skip
    if row.trainer == "torchtitan":
        return [
            sys.executable, str(SCRIPTS / "bench_torchtitan_peer.py"), "--flavor", flavor,
            "--seq-len", str(row.seq_len), "--steps", str(row.steps), "--data", str(data),
            "--first-timed-step", str(first_timed_step), "--work-dir", str(work),
            "--out", str(work / "result.json"), *row.options,
        ]  # fmt: skip
    if row.trainer == "hf":
        return [
            sys.executable, str(SCRIPTS / "bench_hf_peer.py"), "--flavor", flavor, "--seq-len", str(row.seq_len),
            "--steps", str(row.steps), "--warmup", "2", "--out", str(work / "result.json"), *row.options,
        ]  # fmt: skip
    raise ValueError(f"unknown trainer {row.trainer}")


def titan_cp_result(metrics: list[dict], first_timed_step: int, steps: int, log: str) -> dict:
    """Median tokens/s, peak memory and losses from titan_cp's metrics.jsonl records."""
    records = [{"step": r["step"], "tps": r["tps"], "loss": r["loss"], "allocated_gib": r["memory_gib"]} for r in metrics]
    return torchtitan_peer.summarize(
        {"steps": records, "oom": torchtitan_peer.ran_out_of_memory(log)}, first_timed_step, steps
    )


def read_result(row: Row, work: Path, log: str, first_timed_step: int) -> dict:
    if row.trainer == "titan_cp":
        path = work / "metrics.jsonl"
        metrics = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return titan_cp_result(metrics, first_timed_step, row.steps, log)
    path = work / "result.json"
    return json.loads(path.read_text()) if path.exists() else {"status": "failed"}


def loss_parity(reference: list[float], losses: list[float], last: int = 10) -> dict:
    """How far `losses` are from `reference` step by step: the largest relative difference over
    the last `last` common steps, and at the last step."""
    steps = min(len(reference), len(losses))
    if steps == 0:
        return {}
    relative = [abs(a - b) / abs(b) for a, b in zip(losses[:steps], reference[:steps])]
    return {"steps": steps, "max_rel_diff_last": max(relative[-last:]), "rel_diff_final": relative[-1], "window": min(last, steps)}


def add_mfu(result: dict, flavor: str, seq_len: int) -> dict:
    """MFU (causal and torchtitan's formula) from tokens/s, the same formulas for every trainer."""
    if "tokens_per_s" in result:
        args = llama3_flavors[flavor]
        flops = flops_per_token(args.num_params(exclude_embedding=True), args.n_layers, args.n_heads, args.head_dim, seq_len)
        result["mfu_causal"] = 100 * result["tokens_per_s"] * flops.causal / PEAK_BF16_FLOPS
        result["mfu_torchtitan"] = 100 * result["tokens_per_s"] * flops.torchtitan / PEAK_BF16_FLOPS
    return result


def format_table(results: list[dict]) -> str:
    """A markdown table of the results, in run order."""
    lines = [
        "| seq | trainer | setting | tokens/s | MFU causal | MFU torchtitan formula | peak memory | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        causal = f"{r['mfu_causal']:.1f}%" if "mfu_causal" in r else "-"
        titan = f"{r['mfu_torchtitan']:.1f}%" if "mfu_torchtitan" in r else "-"
        memory = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else "-"
        lines.append(
            f"| {seq_name(r['seq_len'])} | {r['trainer']} | {r['setting']} | {tps} | {causal} | {titan} | {memory} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=["peers", "float8"], default="peers")
    p.add_argument("--flavor", default="1B", choices=sorted(llama3_flavors))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[64 * K, 128 * K], help="peers suite")
    p.add_argument("--float8-seq-len", type=int, default=8 * K)
    p.add_argument("--float8-batch", type=int, default=1, help="sequences per step in the float8 suite")
    p.add_argument("--steps", type=int, default=0, help="steps per row; 0: 6 (peers) or 100 (float8)")
    p.add_argument("--first-timed-step", type=int, default=3)
    p.add_argument(
        "--titan-cp-ac", nargs="+", default=["default"], help="titan_cp rows: activation_checkpoint.mode values, or default"
    )
    p.add_argument("--cp", type=int, default=1, help="GPUs per sequence (peers suite), each trainer's own context parallelism")
    p.add_argument(
        "--torchtitan-ac", nargs="+", default=[], choices=sorted(torchtitan_peer.AC_SETTINGS),
        help="torchtitan rows' AC settings; default: its best on one H200 (selective_op to 64K, full beyond)",
    )
    p.add_argument("--only", nargs="*", default=[], help="run only rows whose label contains one of these")
    p.add_argument("--deadline", type=float, default=0, help="skip rows once this many seconds have passed")
    p.add_argument("--corpus", default=str(REPO / "assets" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out-dir", default="outputs/peers")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    if args.suite == "peers":
        rows = peer_rows(args.seq_lens, args.steps or 6, args.titan_cp_ac, args.cp, args.torchtitan_ac)
    else:
        rows = float8_rows(args.float8_seq_len, args.steps or 100)
    rows = [r for r in rows if not args.only or any(o in r.label for o in args.only)]
    data = write_dataset(Path(args.corpus), out_dir / "data" / "corpus.jsonl")
    start = time.monotonic()
    results = []
    for row in rows:
        batch = args.float8_batch if args.suite == "float8" else 1
        command = row_command(row, args.flavor, data, out_dir, args.first_timed_step, batch)
        if args.dry_run:
            print(" ".join(command))
            continue
        work = out_dir / row.label
        work.mkdir(parents=True, exist_ok=True)
        left = args.deadline - (time.monotonic() - start) if args.deadline else row.timeout
        result = {"trainer": row.trainer, "seq_len": row.seq_len, "setting": row.setting, "label": row.label}
        if left < 30:
            result["status"] = "skipped (deadline)"
        else:
            began = datetime.datetime.now(datetime.timezone.utc)
            returncode = torchtitan_peer.run_logged(command, work / "run.log", min(row.timeout, left), {**os.environ, "NGPU": str(args.cp)})
            log = (work / "run.log").read_text(errors="replace")
            result |= read_result(row, work, log, args.first_timed_step)
            result |= {"trainer": row.trainer, "setting": row.setting, "seq_len": row.seq_len}
            if returncode is None:
                result["status"] = "timeout"
            result["date"] = began.strftime("%Y-%m-%d %H:%M UTC")
            result["seconds"] = round((datetime.datetime.now(datetime.timezone.utc) - began).total_seconds())
        result["command"] = " ".join(str(c) for c in command)
        results.append(add_mfu(result, args.flavor, row.seq_len))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    if args.dry_run:
        return []
    if args.suite == "float8":
        by_setting = {r["setting"]: r for r in results}
        for setting in ("float8", "float8_output_bf16"):
            if by_setting.get("bf16", {}).get("losses") and by_setting.get(setting, {}).get("losses"):
                parity = loss_parity(by_setting["bf16"]["losses"], by_setting[setting]["losses"])
                by_setting[setting]["loss_vs_bf16"] = parity
                print(f"{setting} losses against bf16: {parity}", flush=True)
    table = format_table(results)
    print(table, flush=True)
    (out_dir / "peers.md").write_text(table)
    (out_dir / "peers.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
