#!/usr/bin/env python
"""Training throughput of torchtitan 0.2.2 on titan_cp's shapes, data and sequence length: the
same-run peer for titan_cp's end-to-end figures (scripts/bench_peers.py runs both).

    python scripts/bench_torchtitan_peer.py --seq-len 65536 --ac selective_op --steps 6 --out tt.json

torchtitan is installed from wheels (docs/performance.md lists them; it needs triton, so GPU
machines only). This script
- registers titan_cp's `--flavor` in torchtitan's Llama 3 table (`torchtitan.models.llama3.llama3_args`)
  under the same name, with the same shapes and RoPE scaling (torchtitan never ties the output
  projection: the same FLOPs, `vocab x dim` more parameters for the 1B);
- writes an `hf_assets_path` folder with titan_cp's tokenizer.json and a tokenizer_config.json
  naming its bos/eos tokens, and points torchtitan's `c4_test` dataset at a folder holding the
  `--data` jsonl (`{"text": ...}` lines; titan_cp trains on the same file);
- runs `torchtitan.train.main` under torchrun on `--cp` GPUs (one by default) with one sequence
  per step, split over them by torchtitan's own context parallelism when `--cp` > 1, bf16
  compute, `--compile` and the `--ac` setting; booleans are tyro flags (`--compile.enable`, no value);
- reads torchtitan's per-step log lines, plus the peak allocated memory of every step (torchtitan
  itself prints reserved memory), and reports the median tokens/s of steps `--first-timed-step`+.
An out-of-memory run is a result (status "OOM"), not a crash.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script: import titan_cp from this checkout

from peer_result import report  # noqa: E402
from titan_cp.metrics import peak_memory_gib  # noqa: E402
from titan_cp.models.llama3.args import llama3_flavors  # noqa: E402

# torchtitan's activation-checkpointing settings, by the name this script takes.
AC_SETTINGS = {
    "none": ["--activation_checkpoint.mode", "none"],
    "full": ["--activation_checkpoint.mode", "full"],
    "selective_op": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
}
LAUNCH_FLAG = "--launch-torchtitan"
PEAK_LINE = "titan_peer peak allocated"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(
    r"step:\s*(\d+)\s+loss:\s*([-\d.naif]+)\s+grad_norm:\s*([-\d.naif]+)\s+memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)"
)
_PEAK = re.compile(PEAK_LINE + r" step (\d+): ([\d.]+) GiB")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="1B", choices=sorted(llama3_flavors))
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--first-timed-step", type=int, default=3, help="median over this step and later")
    p.add_argument("--ac", default="selective_op", choices=sorted(AC_SETTINGS))
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eager (compiled by default)")
    p.add_argument("--float8", action="store_true", help="torchtitan's float8 converter")
    p.add_argument("--cp", type=int, default=1, help="GPUs, and torchtitan's context-parallel degree over them")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--tokenizer", default=str(REPO / "assets" / "tokenizer" / "tokenizer.json"))
    p.add_argument("--data", required=True, help='jsonl of {"text": ...}, the data titan_cp trains on')
    p.add_argument("--work-dir", default="outputs/torchtitan_peer", help="assets, dataset folder, dump, log")
    p.add_argument("--timeout", type=float, default=0, help="seconds before the run is stopped; 0: none")
    p.add_argument("--out", default="", help="write the result as JSON here")
    return p.parse_args(argv)


def torchtitan_model_fields(flavor: str) -> dict:
    """torchtitan `TransformerModelArgs` fields (and RoPE scaling fields) for titan_cp's `flavor`."""
    args = llama3_flavors[flavor]
    unexpressible = [name for name in ("intermediate_size", "explicit_head_dim") if getattr(args, name) is not None]
    unexpressible += [name for name in ("attention_bias", "mlp_bias") if getattr(args, name)]
    if unexpressible:
        raise SystemExit(f"flavor {flavor} sets {', '.join(unexpressible)}, which torchtitan's Llama 3 args cannot express")
    fields = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
    }
    scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        scaling = {
            "scaling_factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {"model": fields, "rope_scaling": scaling}


def write_assets(work_dir: Path, tokenizer: str, data: str) -> tuple[Path, Path]:
    """The `hf_assets_path` folder and the `c4_test` dataset folder torchtitan reads."""
    with open(tokenizer) as f:
        added = {t["content"] for t in json.load(f).get("added_tokens", [])}
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    if not {bos, eos} <= added:
        raise SystemExit(f"{tokenizer}: torchtitan needs bos/eos tokens {bos} and {eos}; found {sorted(added)}")
    assets = work_dir / "hf_assets"
    dataset = work_dir / "c4_test"
    for folder in (assets, dataset):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, assets / "tokenizer.json")
    (assets / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}) + "\n")
    shutil.copyfile(data, dataset / "train.jsonl")
    return assets, dataset


def torchtitan_argv(args: argparse.Namespace, assets: Path, dataset: Path, dump: Path) -> list[str]:
    """torchtitan's command line (tyro) for this run."""
    argv = [
        "--job.dump_folder", str(dump),
        "--model.name", "llama3", "--model.flavor", args.flavor, "--model.hf_assets_path", str(assets),
        "--training.seq_len", str(args.seq_len), "--training.local_batch_size", "1",
        "--training.steps", str(args.steps), "--training.dataset", "c4_test",
        "--training.dataset_path", str(dataset),
        "--optimizer.lr", str(args.lr), "--lr_scheduler.warmup_steps", str(args.warmup_steps),
        "--metrics.log_freq", "1",
        *AC_SETTINGS[args.ac],
    ]  # fmt: skip
    if args.compile:
        argv.append("--compile.enable")
    if args.cp > 1:
        argv += ["--parallelism.context_parallel_degree", str(args.cp)]
    if args.float8:
        argv += ["--model.converters", "float8"]
    return argv


def parse_log(text: str) -> dict:
    """Per-step records from torchtitan's log and this script's peak-memory lines."""
    text = _ANSI.sub("", text)
    steps = {}
    for step, loss, grad_norm, reserved, tps in _STEP.findall(text):
        steps[int(step)] = {
            "step": int(step), "loss": float(loss), "grad_norm": float(grad_norm),
            "reserved_gib": float(reserved), "tps": float(tps.replace(",", "")),
        }  # fmt: skip
    for step, allocated in _PEAK.findall(text):
        if int(step) in steps:
            steps[int(step)]["allocated_gib"] = float(allocated)
    return {"steps": [steps[k] for k in sorted(steps)], "oom": ran_out_of_memory(text)}


def ran_out_of_memory(log: str) -> bool:
    return "OutOfMemoryError" in log or "CUDA out of memory" in log


def summarize(parsed: dict, first_timed_step: int, expected_steps: int) -> dict:
    """Median tokens/s over the timed steps, peak memory and losses, or why there are none.

    `parsed` is {"steps": records with step, tps, loss and optionally allocated_gib/reserved_gib,
    "oom": whether the run ran out of memory}; titan_cp's metrics.jsonl is summarised the same way.
    """
    records = parsed["steps"]
    timed = [r["tps"] for r in records if r["step"] >= first_timed_step]
    if parsed["oom"]:
        status = "OOM"
    elif len(records) < expected_steps or not timed:
        status = "failed"
    else:
        status = "ok"
    result = {"status": status, "steps_logged": len(records), "losses": [r["loss"] for r in records]}
    if timed:
        result["tokens_per_s"] = statistics.median(timed)
        result["tokens_per_s_range"] = [min(timed), max(timed)]
    for key, name in (("allocated_gib", "peak_memory_gib"), ("reserved_gib", "peak_reserved_gib")):
        values = [r[key] for r in records if key in r]
        if values:
            result[name] = max(values)
    return result


def run_logged(command: list[str], log_path: Path, timeout: float, env: dict | None = None) -> int | None:
    """Run `command` with its output in `log_path`; None if it ran past `timeout` seconds (0: none).

    The command runs in its own process group, so a timeout also ends the processes torchrun
    started, which would otherwise keep their GPU memory while the next benchmark row runs.
    """
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return process.wait(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def launch(tyro_argv: list[str], flavor: str) -> None:
    """Inside torchrun: register the flavor and run torchtitan's trainer, printing peak memory."""
    # torchtitan's ConfigManager.parse_args takes sys.argv[1:] as a default argument, read when
    # torchtitan is imported: set it before the first import.
    sys.argv = [sys.argv[0], *tyro_argv]
    import torch
    import torchtitan.train
    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    fields = torchtitan_model_fields(flavor)
    scaling = fields["rope_scaling"]
    extra = {"rope_scaling_args": RoPEScalingArgs(**scaling)} if scaling else {}
    llama3_args[flavor] = TransformerModelArgs(**fields["model"], **extra)

    class PeakMemoryTrainer(torchtitan.train.Trainer):
        """torchtitan's trainer, printing each step's peak allocated memory before its log resets it."""

        def forward_backward_step(self, *args, **kwargs):
            loss = super().forward_backward_step(*args, **kwargs)
            if int(os.environ.get("RANK", "0")) == 0:
                peak = peak_memory_gib(torch.device("cuda"))
                print(f"{PEAK_LINE} step {self.step}: {peak:.2f} GiB", flush=True)
            return loss

    torchtitan.train.main(PeakMemoryTrainer)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == LAUNCH_FLAG:
        launch(argv[2:], flavor=argv[1])
        return {}
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    assets, dataset = write_assets(work_dir, args.tokenizer, args.data)
    tyro_argv = torchtitan_argv(args, assets, dataset, work_dir / "dump")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.cp),
               str(Path(__file__).resolve()), LAUNCH_FLAG, args.flavor, *tyro_argv]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(work_dir / "hf_cache"), "HF_HUB_OFFLINE": "1"}
    log_path = work_dir / "torchtitan.log"
    returncode = run_logged(command, log_path, args.timeout, env)
    log = log_path.read_text(errors="replace")
    result = {
        "trainer": "torchtitan",
        "flavor": args.flavor,
        "seq_len": args.seq_len,
        "setting": f"AC {args.ac}, {'compiled' if args.compile else 'eager'}"
        + (f", cp {args.cp}" if args.cp > 1 else "")
        + (", float8" if args.float8 else ""),
        **summarize(parse_log(log), args.first_timed_step, args.steps),
        "returncode": returncode,
        "command": " ".join(["python", "scripts/bench_torchtitan_peer.py", *argv]),
    }
    if returncode is None:
        result["status"] = "timeout"
    tps = f"{result['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in result else "no timed step"
    return report(result, f"torchtitan {args.flavor} S={args.seq_len} {result['setting']}: {result['status']}, {tps}", args.out)


if __name__ == "__main__":
    main()
