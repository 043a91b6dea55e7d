#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster through XPK (a JobSet per workload; XPK sets the TPU and
# multislice environment -- TPU_WORKER_HOSTNAMES, MEGASCALE_* -- in every pod, and jax's cluster
# detection reads it).
#
#   launch/xpk.sh [train flags...]
#   CLUSTER=my-gke TPU_TYPE=v5p-64 NUM_SLICES=2 IMAGE=us-docker.pkg.dev/proj/repo/nextstep:latest \
#     launch/xpk.sh --config=configs/stage1.py \
#       --config.mesh.dcn_axes.data=2 --workdir=gs://bucket/runs/stage1
#
# Environment:
#   CLUSTER       the GKE cluster XPK created (xpk cluster create ...)            [required]
#   TPU_TYPE      slice type, e.g. v5p-64, v5litepod-16, v6e-64 (default v5p-64)
#   NUM_SLICES    slices joined by DCN (default 1); pair it with --config.mesh.dcn_axes
#   IMAGE         a container image with this checkout and its requirements plus jax[tpu];
#                 without it XPK builds one from BASE_IMAGE and this directory (--script-dir)
#   BASE_IMAGE    base image for that build (default python:3.11-slim; the command then
#                 installs requirements.txt and jax[tpu] first)
#   WORKLOAD      workload name (default nextstep-<user>-<time>)
#   PROJECT, ZONE gcloud project and zone (default: gcloud's configured ones)
#   PRIORITY      XPK priority (default medium)
#   XPK           the xpk command (default xpk; pip install xpk)
#   EXTRA_ENV     extra "K=V K2=V2" exported before training (e.g. LIBTPU_INIT_ARGS=...)
#   DRY_RUN=1     print the xpk command instead of running it
set -euo pipefail

: "${CLUSTER:?set CLUSTER (the GKE cluster created with xpk cluster create)}"
TPU_TYPE="${TPU_TYPE:-v5p-64}"
NUM_SLICES="${NUM_SLICES:-1}"
WORKLOAD="${WORKLOAD:-nextstep-${USER:-user}-$(date +%m%d-%H%M%S)}"
PRIORITY="${PRIORITY:-medium}"
XPK="${XPK:-xpk}"
EXTRA_ENV="${EXTRA_ENV:-}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
train="NEXTSTEP_DISTRIBUTED=1 $EXTRA_ENV python3 -m nextstep_jax.train$args"

cmd=("$XPK" workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE"
     --num-slices="$NUM_SLICES" --priority="$PRIORITY")
[[ -n "${PROJECT:-}" ]] && cmd+=(--project="$PROJECT")
[[ -n "${ZONE:-}" ]] && cmd+=(--zone="$ZONE")
if [[ -n "${IMAGE:-}" ]]; then
  cmd+=(--docker-image="$IMAGE" --command="env $train")
else
  cmd+=(--base-docker-image="${BASE_IMAGE:-python:3.11-slim}" --script-dir="$REPO"
        --command="pip install -q -r requirements.txt 'jax[tpu]' && env $train")
fi

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
  echo "xpk.sh: submitted $WORKLOAD; follow it with: $XPK workload list --cluster=$CLUSTER" >&2
fi
