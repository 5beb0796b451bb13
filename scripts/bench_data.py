"""Time to the first step and each rank's resident memory of a training run (docs/data.md).

    python scripts/bench_data.py OUT.json [CONFIG] [--section.key value ...]

Starts `scripts/run_train.sh` (NGPU ranks from the environment) with the given config and
overrides, samples every trainer rank's memory from /proc twice a second until the run ends,
and writes: the seconds from the launch to the first metrics record, and per rank the peak of
VmRSS (all resident memory), RssAnon (the process's own allocations) and RssFile (mapped files,
shared libraries included). Compare a run on a large token cache with the same run on the shipped
corpus: the difference is what the data costs a rank.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def trainer_pids(dump_folder: str) -> dict[int, int]:
    """RANK -> pid of each trainer process (not torchrun) writing to `dump_folder`."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"titan_cp.train" not in cmdline or dump_folder.encode() not in cmdline or b"torch.distributed.run" in cmdline:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = int(pid)
    return ranks


def memory_mib(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            values[name] = int(rest.split()[0]) / 1024
    return values


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    config = rest.pop(0) if rest and not rest[0].startswith("--") else "train_configs/debug_model.toml"
    dump = tempfile.mkdtemp(prefix="bench_data_")
    start = time.perf_counter()
    launcher = subprocess.Popen(
        ["bash", str(REPO / "scripts/run_train.sh"), config, "--job.dump_folder", dump, "--metrics.log_freq", "1", *rest],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = Path(dump) / "metrics.jsonl"
    first_step = None
    peaks: dict[int, dict[str, float]] = {}
    while launcher.poll() is None:
        if first_step is None and metrics.exists() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - start
        for rank, pid in trainer_pids(dump).items():
            try:
                now = memory_mib(pid)
            except OSError:
                continue
            peak = peaks.setdefault(rank, dict.fromkeys(FIELDS, 0.0))
            for field in FIELDS:
                peak[field] = max(peak[field], now.get(field, 0.0))
        time.sleep(0.5)
    log = launcher.stdout.read()
    result = {
        "command": " ".join(["NGPU=" + os.environ.get("NGPU", "1"), "scripts/run_train.sh", config, *rest]),
        "returncode": launcher.returncode,
        "seconds_to_first_step": first_step,
        "peak_mib_per_rank": {str(r): {k: round(v, 1) for k, v in peaks[r].items()} for r in sorted(peaks)},
        "data_line": next((line for line in log.splitlines() if "data:" in line), None),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    if launcher.returncode:
        print(log[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
