#!/usr/bin/env bash
# Submit launch/slurm.sbatch for a config on N GPU nodes.
#
#   launch/slurm.sh --nodes 4 --config configs/sft_llama3_8b.py --workdir /shared/runs/sft [--partition gpu] [--dry_run]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

NODES=1 CONFIG="" WORKDIR="" PARTITION="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --partition) PARTITION=$2; shift 2 ;;
    --dry_run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done
[ -n "$CONFIG" ] && [ -n "$WORKDIR" ] || die "--config and --workdir are required"
run env CONFIG="$CONFIG" WORKDIR="$WORKDIR" sbatch --nodes "$NODES" ${PARTITION:+--partition "$PARTITION"} \
  "$here/slurm.sbatch" "${EXTRA[@]}"
