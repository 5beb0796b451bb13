"""The end of a peer benchmark run (bench_hf_peer.py, bench_torchtitan_peer.py): print its
one-line summary and write its result as JSON, so bench_peers.py reads every peer the same way."""

import json


def report(result: dict, summary: str, out: str | None) -> dict:
    print(summary, flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result
