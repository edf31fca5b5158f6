#!/usr/bin/env bash
# Render launch/gke_jobset.yaml and apply it (or print it with --dry_run).
#
#   launch/gke.sh --name sft-8b --image us-docker.pkg.dev/P/R/alignment:latest --tpu-type tpu-v5p-slice \
#       --topology 4x4x4 --hosts 16 --chips-per-host 4 --config configs/sft_llama3_8b.py --workdir gs://B/run [--dry_run]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

NAME="" IMAGE="" TPU_TYPE="" TOPOLOGY="" HOSTS="" CHIPS_PER_HOST=4 CONFIG="" WORKDIR="" MAX_RESTARTS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --tpu-type) TPU_TYPE=$2; shift 2 ;;
    --topology) TOPOLOGY=$2; shift 2 ;;
    --hosts) HOSTS=$2; shift 2 ;;
    --chips-per-host) CHIPS_PER_HOST=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in NAME IMAGE TPU_TYPE TOPOLOGY HOSTS CONFIG WORKDIR; do [ -n "${!v}" ] || die "missing --$v"; done

manifest=$(sed -e "s|\${NAME}|$NAME|g" -e "s|\${IMAGE}|$IMAGE|g" -e "s|\${TPU_TYPE}|$TPU_TYPE|g" \
  -e "s|\${TOPOLOGY}|$TOPOLOGY|g" -e "s|\${HOSTS}|$HOSTS|g" -e "s|\${CHIPS_PER_HOST}|$CHIPS_PER_HOST|g" \
  -e "s|\${CONFIG}|$CONFIG|g" -e "s|\${WORKDIR}|$WORKDIR|g" -e "s|\${MAX_RESTARTS}|$MAX_RESTARTS|g" \
  "$here/gke_jobset.yaml")
if [ "$DRY_RUN" = 1 ]; then
  echo "$manifest"
  echo "kubectl apply -f -"
else
  echo "$manifest" | kubectl apply -f -
fi
