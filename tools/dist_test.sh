#!/usr/bin/env bash
# Multi-GPU testing.
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]     DDP over GPUS processes
#   bash tools/dist_test.sh --sweep BACKBONE_METHOD GPUS              test every trained task,
#                                                                     one per GPU at a time
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${1:-}" = "--sweep" ]; then
  [ $# -ge 3 ] || { echo "usage: $0 --sweep BACKBONE_METHOD GPUS" >&2; exit 2; }
  exec "$PYTHON" tools/sweep.py "$2" --gpus "$3" --mode test
fi
[ $# -ge 3 ] || { echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py args] | --sweep BACKBONE_METHOD GPUS" >&2; exit 2; }
CONFIG=$1; CHECKPOINT=$2; GPUS=$3; shift 3
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$GPUS" \
  --master_port="${PORT:-29500}" tools/test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
