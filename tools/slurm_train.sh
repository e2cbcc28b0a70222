#!/usr/bin/env bash
# Training on a Slurm cluster, one task per GPU (DDP over GPUS GPUs, any number of nodes):
#   [GPUS=16 GPUS_PER_NODE=8 CPUS_PER_TASK=5 SRUN_ARGS=...] \
#     bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]
# GPUS=0 runs one task on the CPU, without distributed start-up.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { echo "usage: $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]" >&2; exit 2; }
PARTITION=$1; JOB_NAME=$2; CONFIG=$3; WORK_DIR=$4; shift 4
source tools/slurm_env.sh
srun -p "$PARTITION" --job-name="$JOB_NAME" "${SRUN_RES[@]}" --kill-on-bad-exit=1 ${SRUN_ARGS} \
  "$PYTHON" -u tools/train.py "$CONFIG" --work-dir="$WORK_DIR" --launcher="$LAUNCHER" "$@"
