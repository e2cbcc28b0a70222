#!/usr/bin/env bash
# On a GPU machine with the dependencies installed: builds the CUDA extensions in place, runs the
# GPU tests and the speed benchmarks, and keeps every log. Stages (default: all but the slow ones):
#   tests   the whole test suite on the GPU (pytest tests -rs), GPU tests included; prints
#           the summary line and the reason of every skip
#   scan    one scan/conv call, memba_vision vs mamba-ssm (tools/benchmark_scan.py)
#   bench   the Vim-S training step, LoRA vs Memba, with a profile (tools/benchmark.py); extra
#           arguments go to it, e.g. --baseline "python third_party/baselines/official_vim_step.py third_party/vim"
#   acc     demo accuracy, bf16 + CUDA graphs vs fp32 eager, 2 tasks x 2 seeds (slow: ~5 min);
#           ACC_CONFIG picks the demo (default configs/demo/vim_tiny_memba_synthetic.py)
#   sweep   projected 19-task sweep time with the real training loop on generated 224x224 data
#           (tools/benchmark_sweep.py --data-root), one task per GPU; SWEEP_METHODS lists the
#           config families (default vim_s_memba)
#   multi   2+ GPUs, Vim-S Memba on synthetic 224x224 tasks (~5 min): DDP train + test
#           (dist_train.sh / dist_test.sh) against tools/test.py on one GPU, training img/s on
#           2 GPUs vs 1, and a 2-GPU sweep of three tasks killed mid-task and resumed;
#           prints PASS/FAIL lines (logs under $LOGS/multi)
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
  # PYTEST_ARGS, e.g. "-n 8 --dist loadfile -v" where pytest-xdist is installed (replaces -q);
  # TEST_FILES: a subset of the suite (default: all of tests/), to split it over several commands
  $PY -m pytest ${TEST_FILES:-tests} -rfs -p no:cacheprovider ${PYTEST_ARGS:--q} > "$LOGS/tests.log" 2>&1
  echo "[gpu_check] tests rc $?: $(tail -1 "$LOGS/tests.log")"
  grep -E "^SKIPPED" "$LOGS/tests.log"
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
      $PY tools/sweep.py --config ${ACC_CONFIG:-configs/demo/vim_tiny_memba_synthetic.py} \
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
  for bm in ${SWEEP_METHODS:-vim_s_memba}; do
    $PY tools/benchmark_sweep.py --backbone-method $bm --data-root $DATA --task dsprites_loc \
      > "$LOGS/benchmark_sweep_$bm.log" 2>&1
    grep -E "^(measured|where|vim_s|vmamba_s)" "$LOGS/benchmark_sweep_$bm.log"
  done
fi
if has multi; then
  M=$LOGS/multi
  NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
  if [ "$NGPU" -lt 2 ]; then
    echo "[gpu_check] multi: SKIP (needs 2 GPUs, found $NGPU)"
  else
    rm -rf "$M"; mkdir -p "$M"
    DATA=$M/data
    CFG=configs/vtab1k/vim_s_memba_dsprites_loc.py
    verdict() { if [ "$1" = 0 ]; then echo "[gpu_check] multi: PASS ${*:2}"; else
                echo "[gpu_check] multi: FAIL ${*:2}"; fi; }
    top1() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['top1'])" "$1" \
               2> /dev/null || echo nan; }
    $PY tools/prepare_vtab1k.py --synthetic --out "$DATA" \
      --tasks dsprites_loc clevr_count dsprites_ori --num-train 800 --num-val 200 \
      --num-test 200 --size 224 > "$M/prepare.log" 2>&1
    # the configs start from a pretrained Vim-S: a random backbone stands in for it
    $PY tools/benchmark_sweep.py --write-pretrained "$M/vim_s_standin.pth" > "$M/pretrained.log" 2>&1
    OPTS=(model.backbone.init_cfg.checkpoint="$M/vim_s_standin.pth"
          train_dataloader.dataset.data_root="$DATA" test_dataloader.dataset.data_root="$DATA")
    # 1. DDP training and testing; the same checkpoint tested on one GPU
    bash tools/dist_train.sh $CFG 2 --work-dir "$M/ddp" --cfg-options "${OPTS[@]}" \
      train_cfg.max_epochs=5 > "$M/ddp_train.log" 2>&1
    verdict $? "DDP training on 2 GPUs (log: $M/ddp_train.log)"
    bash tools/dist_test.sh $CFG "$M/ddp/epoch_5.pth" 2 --work-dir "$M/ddp_test" \
      --cfg-options "${OPTS[@]}" > "$M/ddp_test.log" 2>&1
    verdict $? "DDP testing on 2 GPUs (log: $M/ddp_test.log)"
    $PY tools/test.py $CFG "$M/ddp/epoch_5.pth" --work-dir "$M/one_test" \
      --cfg-options "${OPTS[@]}" > "$M/one_test.log" 2>&1
    a=$(top1 "$M/ddp_test/result_dsprites_loc.json"); b=$(top1 "$M/one_test/result_dsprites_loc.json")
    $PY -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(not abs(a - b) <= 0.5)" "$a" "$b"
    verdict $? "DDP test top-1 $a% vs one GPU $b% on 200 images (at most 1 image apart)"
    # 2. training throughput on 2 GPUs vs 1, same task and epochs: mmengine's iteration
    #    times of epochs 2.. (the first one captures the CUDA graphs), batch 32 per GPU
    EP=6
    $PY tools/train.py $CFG --work-dir "$M/tput_1" --test --cfg-options "${OPTS[@]}" \
      train_cfg.max_epochs=$EP > "$M/tput_1.log" 2>&1
    bash tools/dist_train.sh $CFG 2 --work-dir "$M/tput_2" --test --cfg-options "${OPTS[@]}" \
      train_cfg.max_epochs=$EP > "$M/tput_2.log" 2>&1
    $PY tools/gpu_check_throughput.py 1:"$M/tput_1" 2:"$M/tput_2"
    # 3. a 2-GPU sweep of three tasks, killed mid-task (SIGKILL to its process group), resumed
    SW=$M/sweep
    SWEEP=(tools/sweep.py --config $CFG --tasks dsprites_loc clevr_count dsprites_ori --gpus 2
           --work-root "$SW" --cfg-options "${OPTS[@]}" train_cfg.max_epochs=10)
    setsid $PY "${SWEEP[@]}" > "$M/sweep_killed.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do  # until a task has its first checkpoint (epoch 5), at most 5 min
      ls "$SW"/*/last_checkpoint > /dev/null 2>&1 && break; sleep 1
    done
    kill -9 -- -"$pid" 2> /dev/null; wait "$pid" 2> /dev/null
    killed=$(ls "$SW"/*/last_checkpoint 2> /dev/null | wc -l)
    $PY "${SWEEP[@]}" > "$M/sweep_resumed.log" 2>&1
    rc=$?
    resumed=$(grep -l "resumed epoch" "$SW"/*/sweep.log 2> /dev/null | wc -l)
    results=$(ls "$SW"/*/result_*.json 2> /dev/null | wc -l)
    table=missing; [ -f "$SW/vtab_table.md" ] && table=written
    [ $rc = 0 ] && [ "$killed" -ge 1 ] && [ "$resumed" -ge 1 ] && [ "$results" = 3 ] \
      && [ $table = written ]
    verdict $? "2-GPU sweep: killed with $killed task(s) checkpointed, $resumed resumed," \
      "$results/3 results, table $table (logs: $M/sweep_*.log, $SW/*/sweep.log)"
  fi
fi
