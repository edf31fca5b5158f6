#!/usr/bin/env bash
# Create a Cloud TPU VM slice (queued resources), install this project on every worker, and run one
# config on all workers at once (JAX finds its peers from the TPU environment).
#
#   launch/tpu_pod.sh --name my-v5p --zone us-east5-a --accelerator v5p-64 \
#       --config configs/sft_llama3_8b.py --workdir gs://BUCKET/run1 [--spot] [--dry_run] [-- --config.steps=10]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" RUNTIME="v2-alpha-tpuv5" SPOT="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator) ACCELERATOR=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --spot) SPOT="--spot"; shift ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done
for v in NAME ZONE ACCELERATOR CONFIG WORKDIR; do [ -n "${!v}" ] || die "--$(echo "$v" | tr A-Z a-z) is required"; done

run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
  --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" ${SPOT:+"$SPOT"}
if [ "$DRY_RUN" = 0 ]; then
  until gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --format='value(state.state)' \
      | grep -q ACTIVE; do sleep 30; done
fi
# The tracked files only: a copy of what is committed, never local data or build outputs.
run bash -c "cd '$here/..' && git ls-files -z | tar --null -czf /tmp/alignment-src.tgz -T -"
run gcloud compute tpus tpu-vm scp /tmp/alignment-src.tgz "$NAME":~/ --worker=all --zone "$ZONE"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone "$ZONE" --command \
  "mkdir -p ~/alignment && tar -xzf ~/alignment-src.tgz -C ~/alignment && pip install -q -e ~/alignment[tpu]"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone "$ZONE" --command \
  "cd ~/alignment && python -m alignment.launch --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"
