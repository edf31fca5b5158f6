#!/usr/bin/env bash
# Profile steps 5-7 of a config and print how to view the trace:
#   launch/profile.sh configs/sft.py /tmp/profile-run [--config.key=value ...]
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
python -m alignment.launch --config="$config" --workdir="$workdir" --config.steps=8 \
  --config.profile.enabled=true --config.profile.start_step=5 --config.profile.num_steps=3 "$@"
echo "trace: $workdir/profile  (view: tensorboard --logdir $workdir/profile, Profile tab, or xprof)"
