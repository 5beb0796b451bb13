"""Build the token caches of a run ahead of time, on all cores, so the run starts at once.

    python scripts/prepare_data.py [CONFIG] [--section.key value ...] [--workers N]

Reads the same config and overrides as `scripts/run_train.sh` and prepares what the run would
build at its start: the token cache of training.dataset_path (and of validation.dataset_path
when validation is enabled), plus the packing plan for training.seq_len when packing is on.
Records are encoded by N worker processes (default: every core) in batches; the results are
written in input order, so the cache is the same for any N. A cache that already exists is
reused. Prints a progress line while encoding and, per dataset, tokens/s and peak memory.
"""

import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only modules without torch at the top: the spawned workers import this script again.
from titan_cp.errors import UserError  # noqa: E402

DEFAULT_CONFIG = "train_configs/debug_model.toml"


class Progress:
    """A single status line on stderr, redrawn at most twice a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.perf_counter()
        self.shown = 0.0

    def __call__(self, documents: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.shown < 0.5:
            return
        self.shown = now
        elapsed = now - self.start
        print(
            f"\r{self.label}: {documents:,} documents, {tokens / 1e6:,.1f}M tokens,"
            f" {tokens / max(elapsed, 1e-9) / 1e6:.2f}M tokens/s, {elapsed:.0f} s",
            end="\n" if final else "", file=sys.stderr, flush=True,
        )  # fmt: skip


def peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident memory in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def prepare(cfg, workers: int) -> list[dict]:
    """Build (or find) each dataset's cache and plan; one summary dict per dataset."""
    from titan_cp.data.cache import is_complete
    from titan_cp.data.cache_reader import TokenCache
    from titan_cp.data.corpus import build_corpus, corpus_folder
    from titan_cp.data.formats import Encoder
    from titan_cp.data.loader import truncation_of
    from titan_cp.data.packing import load_or_plan
    from titan_cp.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(cfg.model.tokenizer_path)
    datasets = [("training.dataset_path", cfg.training.dataset_path)]
    if cfg.validation.enable:
        datasets.append(("validation.dataset_path", cfg.validation.dataset_path))
    summaries = []
    for key, path in datasets:
        encoder = Encoder(tokenizer, cfg.training.dataset_format, cfg.training.train_on_inputs)
        folder = corpus_folder(path, cfg.training.dataset_cache_dir, encoder)
        reused = is_complete(folder)
        start = time.perf_counter()
        if not reused:
            progress = Progress(key)
            build_corpus(path, folder, encoder, workers, progress)
        cache = TokenCache(folder)
        if not reused:
            progress(cache.num_documents, cache.num_tokens, final=True)
        seconds = time.perf_counter() - start
        if cfg.training.sample_packing:
            load_or_plan(cache, cfg.training.seq_len, truncation_of(cfg.training, cache))
        summaries.append(
            {
                "key": key,
                "cache": str(folder),
                "reused": reused,
                "documents": cache.num_documents,
                "tokens": cache.num_tokens,
                "targets": cache.num_targets,
                "encode_seconds": seconds,
                "plan_seconds": time.perf_counter() - start - seconds,
            }
        )
    return summaries


def main(argv: list[str]) -> int:
    workers = os.cpu_count() or 1
    if "--workers" in argv:
        at = argv.index("--workers")
        try:
            workers = int(argv[at + 1])
        except (IndexError, ValueError):
            print("error: --workers needs a whole number of processes", file=sys.stderr)
            return 2
        argv = argv[:at] + argv[at + 2 :]
    config = DEFAULT_CONFIG
    if argv and not argv[0].startswith("--"):
        config, argv = argv[0], argv[1:]
    from titan_cp.config import load_config

    try:
        cfg = load_config(["--job.config_file", config, *argv])
        summaries = prepare(cfg, workers)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    own, children = peak_rss_mib()
    for s in summaries:
        state = "reused" if s["reused"] else f"built in {s['encode_seconds']:.1f} s with {workers} worker(s)"
        rate = "" if s["reused"] else f", {s['tokens'] / max(s['encode_seconds'], 1e-9) / 1e6:.2f}M tokens/s"
        print(
            f"{s['key']}: {s['cache']} {state}: {s['documents']:,} documents, {s['tokens']:,} tokens,"
            f" {s['targets']:,} targets{rate}; packing plan {s['plan_seconds']:.1f} s"
        )
    print(f"peak resident memory: {own:.0f} MiB (largest worker {children:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
