#!/usr/bin/env bash
# On a GPU machine with the dependencies installed: builds the CUDA extensions in place, runs the
# GPU tests and the speed benchmarks, and keeps every log. Stages (default: all but the slow ones):
#   tests   kernel and model tests against the references (tests/test_scan_tokens.py,
#           tests/test_bidirectional_ssm.py, tests/test_gpu_parity.py, tests/test_cuda_graph.py,
#           tests/test_data_preprocessor.py, tests/test_device_loader.py)
#   scan    one scan/conv call, memba_vision vs mamba-ssm (tools/benchmark_scan.py)
#   bench   the Vim-S training step, LoRA vs Memba, with a profile (tools/benchmark.py); extra
#           arguments go to it, e.g. --baseline "python third_party/baselines/official_vim_step.py third_party/vim"
#   acc     demo accuracy, bf16 + CUDA graphs vs fp32 eager, 2 tasks x 2 seeds (slow: ~5 min)
#   sweep   projected 19-task sweep time with the real training loop on generated 224x224 data
#           (tools/benchmark_sweep.py --data-root), one task per GPU and two sharing it
#           (SWEEP_JOBS="1 2", the --jobs-per-gpu values to run)
# Usage: STAGES="tests scan bench" LOGS=work_dirs/gpu_check bash tools/gpu_check.sh [benchmark args]
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-tests scan bench sweep}
LOGS=${LOGS:-work_dirs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
has() { [[ " $STAGES " == *" $1 "* ]]; }

t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} MEMBA_CUDA_EXT=1 $PY setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 \
  || { grep -m5 -B2 -A8 error "$LOGS/build.log"; exit 1; }
echo "[gpu_check] build: $(( $(date +%s) - t0 )) s"
if has tests; then
  $PY -m pytest tests/test_scan_tokens.py tests/test_bidirectional_ssm.py tests/test_gpu_parity.py \
    tests/test_cuda_graph.py tests/test_data_preprocessor.py tests/test_device_loader.py \
    -q -s -p no:cacheprovider > "$LOGS/tests.log" 2>&1
  echo "[gpu_check] tests rc $?: $(tail -1 "$LOGS/tests.log")"
  grep -E "^.?(SCAN|PARITY)" "$LOGS/tests.log" | sed 's/^\.//' | tail -8
fi
if has scan; then
  $PY tools/benchmark_scan.py > "$LOGS/benchmark_scan.log" 2>&1; tail -7 "$LOGS/benchmark_scan.log"
fi
if has bench; then
  $PY tools/benchmark.py --models vim_s --batch-sizes 32 --precisions bf16 --methods lora memba \
    --modes graph --profile "$@" > "$LOGS/benchmark.log" 2>&1
  grep -E "^(baseline|vim_s|profile|speed-up|ratio)" "$LOGS/benchmark.log"
fi
if has acc; then
  DATA=data/vtab-1k-synthetic
  $PY tools/prepare_vtab1k.py --synthetic --out $DATA --tasks dsprites_loc clevr_count \
    --num-train 320 --num-val 80 --num-test 300 --size 32 > "$LOGS/acc_prepare.log" 2>&1
  for seed in 0 1; do
    for mode in fast ref; do
      opts=(train_dataloader.dataset.data_root=$DATA test_dataloader.dataset.data_root=$DATA
            randomness.seed=$seed)
      train_args=()
      if [[ $mode == ref ]]; then opts+=(model.backbone.cuda_graph=False); train_args=(-- --fp32); fi
      $PY tools/sweep.py --config configs/demo/vim_tiny_memba_synthetic.py \
        --tasks dsprites_loc clevr_count --gpus 1 --work-root "$LOGS/acc_${mode}_$seed" \
        --cfg-options "${opts[@]}" "${train_args[@]}" > "$LOGS/acc_${mode}_$seed.log" 2>&1
      echo "[gpu_check] accuracy $mode seed $seed: $(grep -A2 '| Backbone' "$LOGS/acc_${mode}_$seed.log" \
        | tail -1 | tr -s ' |–' ' ')"
    done
  done
fi
if has sweep; then
  DATA=data/vtab-1k-synthetic-224
  $PY tools/prepare_vtab1k.py --synthetic --out $DATA --tasks dsprites_loc --num-test 100 \
    --size 224 > "$LOGS/sweep_prepare.log" 2>&1
  for jobs in ${SWEEP_JOBS:-1 2}; do
    $PY tools/benchmark_sweep.py --data-root $DATA --task dsprites_loc --jobs-per-gpu $jobs \
      > "$LOGS/benchmark_sweep_$jobs.log" 2>&1
    grep -E "^(measured|[0-9] tasks sharing|where|vim_s)" "$LOGS/benchmark_sweep_$jobs.log"
  done
fi
