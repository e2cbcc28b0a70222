#!/usr/bin/env bash
# Quick start on a CPU: sets up .venv (first run: several minutes of downloads),
# writes small synthetic VTAB-style tasks, fine-tunes a tiny Memba Vim on two of
# them, tests it, and prints the VTAB-1k table. Re-running skips finished steps;
# `bash tools/demo.sh --fresh` starts the training over.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh

DATA=data/vtab-1k-synthetic
WORK=work_dirs/demo
TASKS="dsprites_loc clevr_count"
if [ "${1:-}" = "--fresh" ]; then rm -rf "$WORK"; fi

echo "[demo] writing the synthetic tasks to $DATA"
"$VENV_PY" tools/prepare_vtab1k.py --synthetic --out "$DATA" --tasks $TASKS \
  --num-train 320 --num-val 80 --num-test 300 --size 32

echo "[demo] fine-tuning a tiny Memba Vim on: $TASKS (logs and checkpoints in $WORK)"
"$VENV_PY" tools/sweep.py --config configs/demo/vim_tiny_memba_synthetic.py \
  --tasks $TASKS --gpus 1 --work-root "$WORK" --verbose \
  --cfg-options "train_dataloader.dataset.data_root=$DATA" "test_dataloader.dataset.data_root=$DATA"

echo "[demo] drawing membrane, spike and saliency maps of the first test image of each task"
for task in $TASKS; do
  ckpt=$(cat "$WORK/$task/last_checkpoint")
  image="$DATA/$task/$(head -n 1 "$DATA/$task/test.txt" | cut -d ' ' -f 1)"
  classes=$("$VENV_PY" -c "from memba_vision.datasets.vtab1k_tasks import get_task
print(get_task('$task').num_classes)")
  "$VENV_PY" tools/visualize.py configs/demo/vim_tiny_memba_synthetic.py "$ckpt" "$image" \
    --out-dir "$WORK/figures/$task" --cfg-options "model.head.num_classes=$classes"
done
