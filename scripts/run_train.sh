#!/usr/bin/env bash
# Launch titan_cp training with torchrun.
#   ./scripts/run_train.sh [CONFIG] [--section.key value ...]
#   ./scripts/run_train.sh [CONFIG] [--section.key value ...] --help-memory [--device-memory-gib N]
#     prints the longest training.seq_len that fits one GPU and the lever to turn next, without
#     starting a run (no GPU needed; docs/memory.md)
# CONFIG defaults to train_configs/debug_model.toml. Environment:
#   NGPU      processes to start (default: the GPUs present, else 1)
#   LOG_RANK  ranks whose output is shown (default 0; e.g. 0,1)
# Several nodes (run this script once on each; NGPU is then the processes per node):
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500)   static rendezvous, or
#   NNODES, RDZV_ENDPOINT (host:port), RDZV_ID (default titan_cp)  c10d rendezvous
# Without NNODES (or with NNODES=1) the run is single-node (torchrun --standalone).
set -euo pipefail

cd "$(dirname "$0")/.."

CONFIG=train_configs/debug_model.toml
if [[ $# -gt 0 && "$1" != --* ]]; then
  CONFIG=$1
  shift
fi

for arg in "$@"; do
  if [[ "$arg" == --help || "$arg" == -h ]]; then
    exec python3 -m titan_cp.train --help
  fi
  if [[ "$arg" == --help-memory ]]; then
    exec python3 -m titan_cp.memory_report --job.config_file "$CONFIG" "$@"
  fi
done

if [[ -z "${NGPU:-}" ]]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NGPU" -gt 0 ]] || NGPU=1
fi
LOG_RANK=${LOG_RANK:-0}

# torchrun's rendezvous: one node by default, several from the environment.
NNODES=${NNODES:-1}
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  RENDEZVOUS=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-titan_cp}")
elif [[ "$NNODES" != 1 ]]; then
  if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NNODES=$NNODES needs NODE_RANK and MASTER_ADDR (node 0's address), or RDZV_ENDPOINT" >&2
    exit 2
  fi
  RENDEZVOUS=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  RENDEZVOUS=(--standalone)
fi

# Workers write a user mistake (bad key, file, degree) here and exit quietly, so the user sees
# one line instead of torchrun's failure report; this script then exits non-zero.
TITAN_CP_ERROR_FILE=$(mktemp)
export TITAN_CP_ERROR_FILE
trap 'rm -f "$TITAN_CP_ERROR_FILE"' EXIT

# Once a rank has written its one-line error (a rank out of memory exits non-zero, so torchrun
# stops the others), what follows on stderr is noise: torchrun's failure report with its
# traceback, and the other ranks' errors as their peer disappears. It is dropped; the line is
# printed at the end.
hide_after_error() {
  local line
  while IFS= read -r line; do
    [[ -s "$TITAN_CP_ERROR_FILE" ]] || printf '%s\n' "$line"
  done
}

# SIGTERM (preemption) goes to the ranks themselves: each saves a checkpoint and exits 0.
# Signalling torchrun instead would make it exit 1 after its workers finished cleanly.
python3 -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc-per-node "$NGPU" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titan_cp.train --job.config_file "$CONFIG" "$@" 2> >(hide_after_error >&2) &
child=$!
trapped=0
trap 'trapped=1; pkill -TERM -P "$child" 2>/dev/null' TERM INT
status=0
wait "$child" || status=$?
# A trapped signal interrupts wait (status 128+n) before torchrun ends; wait for its real status.
if (( trapped && status > 128 )); then
  status=0
  wait "$child" || status=$?
fi

if [[ -s "$TITAN_CP_ERROR_FILE" ]]; then
  cat "$TITAN_CP_ERROR_FILE" >&2
  exit 2
fi
exit "$status"
