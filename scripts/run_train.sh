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

# Ranks write a user mistake (bad key, file, degree) here instead of raising it, so the user sees
# one line instead of torchrun's failure report; this script then exits 2.
TITAN_CP_ERROR_FILE=$(mktemp)
export TITAN_CP_ERROR_FILE
trap 'rm -f "$TITAN_CP_ERROR_FILE"' EXIT

# With several ranks and no OMP_NUM_THREADS, torchrun warns and gives each rank one thread;
# share the machine's cores between the ranks instead.
if [[ -z "${OMP_NUM_THREADS:-}" && "$NGPU" -gt 1 ]]; then
  OMP_NUM_THREADS=$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))
  export OMP_NUM_THREADS
fi

# torchrun runs in a session of its own (setsid), so a Ctrl-C at the terminal reaches this script
# only, not torchrun: torchrun would answer it with tracebacks. Signals are passed on to the
# ranks themselves (torchrun's children):
# - SIGTERM (preemption) or SIGHUP (terminal closed): each rank saves a checkpoint and exits 0;
#   signalling torchrun instead would make it exit 1 after its ranks finished cleanly.
# - the first Ctrl-C (SIGINT): the same, and this script exits 130 afterwards;
# - a second Ctrl-C: torchrun and every rank are killed at once (torchrun first, so it prints no
#   failure report), without saving.
setsid python3 -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc-per-node "$NGPU" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titan_cp.train --job.config_file "$CONFIG" "$@" &
child=$!
interrupted=0

kill_all_now() {
  local ranks
  ranks=$(pgrep -P "$child" || true)
  kill -KILL "$child" 2>/dev/null || true
  for rank in $ranks; do
    # Each rank leads a process group of its own (torchrun starts it so); take its helpers too.
    kill -KILL -- "-$rank" "$rank" 2>/dev/null || true
  done
}

on_interrupt() {
  if (( interrupted )); then
    echo "second Ctrl-C: stopped at once, without saving" >&2
    kill_all_now
  else
    interrupted=1
    pkill -INT -P "$child" 2>/dev/null || true
  fi
}
trap on_interrupt INT
trap 'pkill -TERM -P "$child" 2>/dev/null || true' TERM HUP

# A rank that finds a mistake writes it to the error file and waits: the ranks still running may
# be waiting for it in a collective, so every rank is ended here at once (no failure report).
while kill -0 "$child" 2>/dev/null; do
  if [[ -s "$TITAN_CP_ERROR_FILE" ]]; then
    kill_all_now
    break
  fi
  # In the background, so a signal's trap runs at once instead of after the sleep.
  sleep 0.5 & wait $! || true
done
status=0
wait "$child" 2>/dev/null || status=$?

if [[ -s "$TITAN_CP_ERROR_FILE" ]]; then
  head -n 1 "$TITAN_CP_ERROR_FILE" >&2
  exit 2
fi
if (( interrupted )); then
  exit 130
fi
exit "$status"
