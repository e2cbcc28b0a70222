#!/usr/bin/env bash
# Multi-GPU training.
#   bash tools/dist_train.sh CONFIG GPUS [train.py args]
#       one config, DDP over GPUS processes (torchrun)
#   bash tools/dist_train.sh --sweep BACKBONE_METHOD GPUS [train.py args]
#       all 19 VTAB-1k tasks of e.g. vim_s_memba, one task per GPU at a time,
#       each trained then tested; finished tasks are skipped, interrupted ones resumed
#   bash tools/dist_train.sh --sweep BACKBONE GPUS --methods M [M ...] [-- train.py args]
#       the same for each method of e.g. vim_s in turn, then one table of all of them
# Several nodes (run on each, NODE_RANK 0 .. NNODES-1; GPUS is per node):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 PORT=29500 bash tools/dist_train.sh CONFIG 8
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${1:-}" = "--sweep" ]; then
  [ $# -ge 3 ] || { echo "usage: $0 --sweep BACKBONE_METHOD GPUS [train.py args]" >&2; exit 2; }
  BM=$2; GPUS=$3; shift 3
  METHODS=()
  if [ "${1:-}" = "--methods" ]; then  # --methods M [M ...], up to -- or the end
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do METHODS+=("$1"); shift; done
    if [ $# -gt 0 ]; then shift; fi
  fi
  exec "$PYTHON" tools/sweep.py "$BM" --gpus "$GPUS" --mode train \
    ${METHODS[@]+"${METHODS[@]}"} -- "$@"
fi
[ $# -ge 2 ] || { echo "usage: $0 CONFIG GPUS [train.py args] | --sweep BACKBONE_METHOD GPUS" >&2; exit 2; }
CONFIG=$1; GPUS=$2; shift 2
exec "$PYTHON" -m torch.distributed.run --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --nproc_per_node="$GPUS" \
  --master_port="${PORT:-29500}" tools/train.py "$CONFIG" --launcher pytorch "$@"
