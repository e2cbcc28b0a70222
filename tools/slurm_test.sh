#!/usr/bin/env bash
# Testing on a Slurm cluster, one task per GPU (same variables as tools/slurm_train.sh):
#   [GPUS=8 GPUS_PER_NODE=8 CPUS_PER_TASK=5 SRUN_ARGS=...] \
#     bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]" >&2
                  exit 2; }
PARTITION=$1; JOB_NAME=$2; CONFIG=$3; CHECKPOINT=$4; shift 4
source tools/slurm_env.sh
srun -p "$PARTITION" --job-name="$JOB_NAME" "${SRUN_RES[@]}" --kill-on-bad-exit=1 ${SRUN_ARGS} \
  "$PYTHON" -u tools/test.py "$CONFIG" "$CHECKPOINT" --launcher="$LAUNCHER" "$@"
