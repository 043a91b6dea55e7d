#!/usr/bin/env bash
# Several jax processes on this machine, joined by jax.distributed over localhost with CPU (gloo)
# collectives: the multi-host code path (per-process data shards, global arrays, multi-process
# orbax checkpoints) without a cluster.
#
#   launch/local.sh N [args for the module...]
#   launch/local.sh 2 --config=configs/demo.py --workdir=runs/demo2
#
# Environment (all optional):
#   MODULE                 python module to run (default nextstep_jax.train)
#   PYTHON                 interpreter (default: python on PATH)
#   PORT                   coordinator port on localhost (default: a free one)
#   DEVICES_PER_PROCESS    CPU devices in each process (default 1): total devices = N * this
#   LOG_DIR                write process i's output to LOG_DIR/process_i.log (default: process 0 to
#                          the terminal, the others to LOG_DIR=$(mktemp -d))
# Each process gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
# (read by nextstep_jax.parallel.maybe_initialize_distributed), JAX_PLATFORMS=cpu and
# JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo. The script exits with the first non-zero status, and
# stops the remaining processes when one fails or on Ctrl-C.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [module args...]" >&2
  exit 2
fi
N="$1"; shift
MODULE="${MODULE:-nextstep_jax.train}"
PYTHON="${PYTHON:-python}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
LOG_DIR="${LOG_DIR:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
cd "$(dirname "$0")/.."

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  env JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
      "$PYTHON" -m "$MODULE" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: $N processes (pids ${pids[*]}), coordinator localhost:$PORT, logs in $LOG_DIR" >&2
if [[ -z "${QUIET:-}" ]]; then
  tail -n +1 -f "$LOG_DIR/process_0.log" &
  tail_pid=$!
fi

status=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      rc=0; wait "$pid" || rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "local.sh: process with pid $pid exited with status $rc; stopping the others" >&2
        cleanup
      fi
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
  ((${#remaining[@]})) && sleep 0.5
done
if [[ -n "${tail_pid:-}" ]]; then
  sleep 0.2
  kill "$tail_pid" 2>/dev/null || true
fi
if ((status != 0)); then
  for ((i = 0; i < N; i++)); do
    echo "---- process $i (last lines of $LOG_DIR/process_$i.log)" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
  done
fi
exit "$status"
