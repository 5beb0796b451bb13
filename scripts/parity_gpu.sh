#!/usr/bin/env bash
# GPU parity runs: the same model, seed and global batch on 1 GPU and on 2 GPUs (FSDP, cp=2 in
# both layouts, packed documents with cp=2), bf16. Prints each run's losses and the largest
# relative difference from its 1-GPU reference. Usage: scripts/parity_gpu.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/parity_gpu.sh OUT_DIR}
steps=${STEPS:-10}
mkdir -p "$out"

run() {  # run NAME NGPU overrides...
  local name=$1 ngpu=$2
  shift 2
  NGPU=$ngpu ./scripts/run_train.sh train_configs/debug_model.toml --job.dump_folder "$out/$name" \
    --metrics.log_freq 1 --training.steps "$steps" --lr_scheduler.warmup_steps 2 "$@" >"$out/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -20 "$out/$name.log"; }
}

debug=(--model.flavor debugmodel --training.seq_len 2048 --training.local_batch_size 2 --training.global_batch_size 4)
one_b=(--model.flavor 1B --training.seq_len 16384 --training.local_batch_size 1 --optimizer.lr 3e-4)

run debug_1gpu 1 "${debug[@]}"
run debug_fsdp2 2 "${debug[@]}"
run 1b_1gpu 1 "${one_b[@]}" --training.global_batch_size 2
run 1b_fsdp2 2 "${one_b[@]}" --training.global_batch_size 2
run 1b_cp1 1 "${one_b[@]}"
run 1b_cp2_zigzag 2 "${one_b[@]}" --parallelism.context_parallel_degree 2
run 1b_cp2_contiguous 2 "${one_b[@]}" --parallelism.context_parallel_degree 2 --parallelism.context_parallel_load_balancer none
run 1b_pack_cp1 1 "${one_b[@]}" --training.sample_packing true
run 1b_pack_cp2 2 "${one_b[@]}" --training.sample_packing true --parallelism.context_parallel_degree 2

python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def records(name):
    path = out / name / "metrics.jsonl"
    return [json.loads(l) for l in path.open()] if path.exists() else []
pairs = [("debug_fsdp2", "debug_1gpu"), ("1b_fsdp2", "1b_1gpu"), ("1b_cp2_zigzag", "1b_cp1"),
         ("1b_cp2_contiguous", "1b_cp1"), ("1b_pack_cp2", "1b_pack_cp1")]
print("| run | reference | steps | max rel. loss diff | first/last loss | tps/GPU | peak GiB |")
print("|---|---|---|---|---|---|---|")
for run, ref in pairs:
    a, b = records(run), records(ref)
    if not a or not b:
        print(f"| {run} | {ref} | missing | | | | |"); continue
    diff = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))
    print(f"| {run} | {ref} | {len(a)} | {diff:.2e} | {a[0]['loss']:.4f}/{a[-1]['loss']:.4f} vs {b[0]['loss']:.4f}/{b[-1]['loss']:.4f}"
          f" | {a[-1]['tps']:.0f} vs {b[-1]['tps']:.0f} | {a[-1]['memory_gib']:.1f} vs {b[-1]['memory_gib']:.1f} |")
PY
