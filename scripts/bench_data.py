"""Time to the first step and each rank's resident memory of a training run (docs/data.md).

    python scripts/bench_data.py OUT.json [CONFIG] [--section.key value ...]
    python scripts/bench_data.py --loader OUT.json [CONFIG] [--section.key value ...]

Starts `scripts/run_train.sh` (NGPU ranks from the environment) with the given config and
overrides, samples every trainer rank's memory from /proc twice a second until the run ends,
and writes: the seconds from the launch to the start of the first step (the trainer's "training
from step" line: everything before it is start-up, data included) and to the first metrics
record (the first step done), and per rank the peak of
VmRSS (all resident memory), RssAnon (the process's own allocations) and RssFile (mapped files,
shared libraries included). Compare a run on a large token cache with the same run on the shipped
corpus: the difference is what the data costs a rank.

With `--loader`, builds the data loader of dp rank 0 of 4 in this process instead and reads
200 micro-batches, and writes how much VmRSS, RssAnon and RssFile grew: the data's own memory.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIELDS = ("VmRSS", "RssAnon", "RssFile")

from tests.train_utils import trainer_ranks  # noqa: E402  (finds a run's trainer processes)


def memory_mib(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


def loader_memory(out: Path, argv: list[str]) -> None:
    from titan_cp.config import load_config
    from titan_cp.data import Tokenizer, build_dataloader

    config = argv.pop(0) if argv and not argv[0].startswith("--") else "train_configs/debug_model.toml"
    cfg = load_config(["--job.config_file", config, *argv])
    tokenizer = Tokenizer(cfg.model.tokenizer_path)
    before = memory_mib(os.getpid())
    start = time.perf_counter()
    loader = build_dataloader(cfg.training, tokenizer, dp_rank=0, dp_world_size=4, seed=0)
    opened = time.perf_counter() - start
    for _ in range(200):
        next(loader)
    after = memory_mib(os.getpid())
    result = {
        "command": " ".join(["scripts/bench_data.py --loader", config, *argv]),
        "seconds_to_open": round(opened, 3),
        "seconds_per_micro_batch": round((time.perf_counter() - start - opened) / 200, 5),
        "growth_mib": {k: round(after[k] - before[k], 1) for k in FIELDS},
        "summary": loader.summary(),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def main(argv: list[str]) -> None:
    if argv[0] == "--loader":
        loader_memory(Path(argv[1]), argv[2:])
        return
    out, rest = Path(argv[0]), argv[1:]
    config = rest.pop(0) if rest and not rest[0].startswith("--") else "train_configs/debug_model.toml"
    dump = tempfile.mkdtemp(prefix="bench_data_")
    start = time.perf_counter()
    log_path = Path(dump) / "launcher.log"
    with open(log_path, "w") as log_file:
        launcher = subprocess.Popen(
            ["bash", str(REPO / "scripts/run_train.sh"), config, "--job.dump_folder", dump, "--metrics.log_freq", "1", *rest],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    metrics = Path(dump) / "metrics.jsonl"
    first_step = training_starts = None
    peaks: dict[int, dict[str, float]] = {}
    while launcher.poll() is None:
        if training_starts is None and "training from step" in log_path.read_text():
            training_starts = time.perf_counter() - start
        if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - start
        for rank, pid in trainer_ranks(Path(dump)).items():
            try:
                now = memory_mib(pid)
            except OSError:
                continue
            peak = peaks.setdefault(rank, dict.fromkeys(FIELDS, 0.0))
            for field in FIELDS:
                peak[field] = max(peak[field], now.get(field, 0.0))
        time.sleep(0.5)
    log = log_path.read_text()
    shutil.rmtree(dump)
    result = {
        "command": " ".join(["NGPU=" + os.environ.get("NGPU", "1"), "scripts/run_train.sh", config, *rest]),
        "returncode": launcher.returncode,
        "seconds_to_training_start": training_starts,
        "seconds_to_first_step_done": first_step,
        "peak_mib_per_rank": {str(r): {k: round(v, 1) for k, v in peaks[r].items()} for r in sorted(peaks)},
        "data_line": next((line for line in log.splitlines() if "data:" in line), None),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if launcher.returncode:
        print(log[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
