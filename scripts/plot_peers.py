#!/usr/bin/env python
"""Chart of scripts/bench_peers.py's JSON: tokens/s and peak memory against sequence length.

    python scripts/plot_peers.py outputs/peers/peers.json --out docs/bench/peers/peers.png

One line per trainer (titan_cp, torchtitan, HF transformers) over the rows that trained (for
titan_cp, the rows of one setting: `--titan-cp-setting`, the config's defaults unless told); a row
that ran out of memory is drawn as a cross at the top of the memory panel (it needed more than
the GPU has). Needs matplotlib (on the GPU machine; not a titan_cp dependency).
"""

import argparse
import json
from pathlib import Path

NAMES = {"titan_cp": "titan_cp", "torchtitan": "torchtitan 0.2.2", "hf": "HF transformers + Liger"}
GPU_MEMORY_GIB = 141


def series(results: list[dict]) -> dict[str, dict[str, list]]:
    """Per trainer, sorted by sequence length: the rows that trained and the lengths that ran out of memory."""
    out: dict[str, dict[str, list]] = {}
    for r in sorted(results, key=lambda r: r["seq_len"]):
        line = out.setdefault(r["trainer"], {"seq_len": [], "tokens_per_s": [], "peak_memory_gib": [], "oom": [], "setting": []})
        if r.get("status") == "ok":
            line["seq_len"].append(r["seq_len"])
            line["tokens_per_s"].append(r["tokens_per_s"])
            line["peak_memory_gib"].append(r["peak_memory_gib"])
            line["setting"].append(r["setting"])
        elif r.get("status") == "OOM":
            line["oom"].append(r["seq_len"])
    return out


def drawn_rows(results: list[dict], titan_cp_setting: str) -> list[dict]:
    """Every peer's rows, and titan_cp's of one setting (one line per trainer)."""
    return [r for r in results if r["trainer"] != "titan_cp" or r["setting"] == titan_cp_setting]


def plot(results: list[dict], out: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_peers.py needs matplotlib (pip install matplotlib)") from None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = sorted({r["seq_len"] for r in results})
    for trainer, line in series(results).items():
        label = NAMES.get(trainer, trainer)
        if trainer == "titan_cp" and line["setting"]:
            label += f" ({line['setting'][0]})"
        k = [s // 1024 for s in line["seq_len"]]
        speed.plot(k, line["tokens_per_s"], marker="o", label=label)
        points = memory.plot(k, line["peak_memory_gib"], marker="o", label=label)
        if line["oom"]:
            memory.scatter([s // 1024 for s in line["oom"]], [GPU_MEMORY_GIB] * len(line["oom"]), marker="x", s=80,
                           color=points[0].get_color(), label=f"{label}: out of memory")  # fmt: skip
    for axis, ylabel in ((speed, "tokens/s (one H200)"), (memory, "peak memory (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([s // 1024 for s in lengths], [f"{s // 1024}K" for s in lengths])
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    memory.axhline(GPU_MEMORY_GIB, color="grey", linestyle="--", linewidth=1)
    speed.legend()
    memory.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="peers.json files of scripts/bench_peers.py")
    p.add_argument("--out", default="peers.png")
    p.add_argument("--titan-cp-setting", default="default", help="the titan_cp rows to draw (bench_peers' setting)")
    p.add_argument("--title", default="Llama 3.2 1B shapes, one sequence per step, bf16, one H200")
    args = p.parse_args(argv)
    results = [r for path in args.results for r in json.loads(Path(path).read_text())]
    results = drawn_rows(results, args.titan_cp_setting)
    plot(results, Path(args.out), args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
