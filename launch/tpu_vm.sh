#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or several hosts), or on several slices (multislice over DCN).
# Runs the same command on every worker with `gcloud compute tpus tpu-vm ssh --worker=all`; jax
# finds its peers through the TPU metadata (NEXTSTEP_DISTRIBUTED=1 makes
# nextstep_jax.parallel call jax.distributed.initialize() with auto-detection).
#
#   launch/tpu_vm.sh setup                     # copy this checkout to every worker, install deps
#   launch/tpu_vm.sh train [train flags...]    # python -m nextstep_jax.train on every worker
#   launch/tpu_vm.sh run "shell command"       # any command on every worker (in the checkout)
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh setup
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh train --config=configs/stage1.py \
#     --config.data.source=gs://bucket/data \
#     --config.tokenizer.path=gs://bucket/tok --workdir=gs://bucket/runs/stage1
#
# Environment:
#   TPU_NAME      the TPU VM (single slice), or with NUM_SLICES > 1 the node prefix of a
#                 queued-resource multislice: slices are named $TPU_NAME-0 .. $TPU_NAME-(N-1)  [required]
#   ZONE          its zone                                                                    [required]
#   PROJECT       gcloud project (default: gcloud's configured one)
#   NUM_SLICES    slices joined by DCN (default 1). With N > 1 every worker also gets
#                 MEGASCALE_COORDINATOR_ADDRESS (worker 0 of slice 0, port MEGASCALE_PORT),
#                 MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, MEGASCALE_PORT; set
#                 --config.mesh.dcn_axes (e.g. data=N) so only the data axis crosses DCN.
#   MEGASCALE_PORT  DCN coordinator port (default 8080)
#   REMOTE_DIR    checkout location on the workers (default: nextstep-jax in the home directory)
#   PYTHON        interpreter on the workers (default python3)
#   EXTRA_ENV     extra "K=V K2=V2" exported before the command (e.g. LIBTPU_INIT_ARGS=...)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
action="$1"; shift
: "${TPU_NAME:?set TPU_NAME (the TPU VM, or the multislice node prefix)}"
: "${ZONE:?set ZONE}"
NUM_SLICES="${NUM_SLICES:-1}"
MEGASCALE_PORT="${MEGASCALE_PORT:-8080}"
REMOTE_DIR="${REMOTE_DIR:-nextstep-jax}"
PYTHON="${PYTHON:-python3}"
EXTRA_ENV="${EXTRA_ENV:-}"
gflags=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gflags+=(--project="$PROJECT")
REPO="$(cd "$(dirname "$0")/.." && pwd)"

slice_name() {  # slice index -> TPU VM name
  if ((NUM_SLICES > 1)); then echo "$TPU_NAME-$1"; else echo "$TPU_NAME"; fi
}

on_all_workers() {  # slice, command
  gcloud compute tpus tpu-vm ssh "$(slice_name "$1")" "${gflags[@]}" --worker=all --command="$2"
}

coordinator_ip() {  # internal IP of worker 0 of slice 0
  gcloud compute tpus tpu-vm describe "$(slice_name 0)" "${gflags[@]}" \
    --format='value(networkEndpoints[0].ipAddress)'
}

run_everywhere() {  # command (run in REMOTE_DIR with the distributed environment)
  local cmd="$1" pids=() status=0 coord=""
  ((NUM_SLICES > 1)) && coord="$(coordinator_ip)"
  for ((s = 0; s < NUM_SLICES; s++)); do
    local env="NEXTSTEP_DISTRIBUTED=1 $EXTRA_ENV"
    if ((NUM_SLICES > 1)); then
      env+=" MEGASCALE_COORDINATOR_ADDRESS=$coord:$MEGASCALE_PORT MEGASCALE_NUM_SLICES=$NUM_SLICES"
      env+=" MEGASCALE_SLICE_ID=$s MEGASCALE_PORT=$MEGASCALE_PORT"
    fi
    on_all_workers "$s" "cd $REMOTE_DIR && env $env $cmd" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

case "$action" in
  setup)
    archive="$(mktemp --suffix=.tar.gz)"
    git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$archive"
    for ((s = 0; s < NUM_SLICES; s++)); do
      gcloud compute tpus tpu-vm scp "$archive" "$(slice_name "$s")":nextstep-jax.tar.gz \
        "${gflags[@]}" --worker=all
      on_all_workers "$s" "mkdir -p $REMOTE_DIR && tar -xzf nextstep-jax.tar.gz -C $REMOTE_DIR && \
        cd $REMOTE_DIR && $PYTHON -m pip install -q -r requirements.txt 'jax[tpu]'" &
    done
    wait
    rm -f "$archive"
    ;;
  train)
    args=""
    for a in "$@"; do args+=" $(printf '%q' "$a")"; done
    run_everywhere "$PYTHON -m nextstep_jax.train$args"
    ;;
  run)
    [[ $# -eq 1 ]] || usage
    run_everywhere "$1"
    ;;
  *) usage ;;
esac
