#!/usr/bin/env bash
# Multi-GPU testing.
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]     DDP over GPUS processes
#   bash tools/dist_test.sh --sweep BACKBONE_METHOD GPUS              test every trained task,
#                                                                     one per GPU at a time
#   bash tools/dist_test.sh --sweep BACKBONE GPUS --methods M [M ...] the same for each method
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR, PORT as in tools/dist_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${1:-}" = "--sweep" ]; then
  [ $# -ge 3 ] || { echo "usage: $0 --sweep BACKBONE_METHOD GPUS [--methods M ...]" >&2; exit 2; }
  exec "$PYTHON" tools/sweep.py "$2" --gpus "$3" --mode test "${@:4}"
fi
[ $# -ge 3 ] || { echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py args] | --sweep BACKBONE_METHOD GPUS" >&2; exit 2; }
CONFIG=$1; CHECKPOINT=$2; GPUS=$3; shift 3
exec "$PYTHON" -m torch.distributed.run --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --nproc_per_node="$GPUS" \
  --master_port="${PORT:-29500}" tools/test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
