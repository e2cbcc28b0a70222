#!/usr/bin/env bash
# The 19-task sweep on a Slurm cluster: one array job per task (trained, then tested, with
# tools/sweep.py's rules: a task with a result file is skipped, an interrupted one resumes),
# then a job that writes the table once all of them have ended.
#   [GPUS_PER_TASK=1 CPUS_PER_TASK=5 SBATCH_ARGS=...] \
#     bash tools/slurm_sweep.sh PARTITION BACKBONE_METHOD [tools/sweep.py options]
#   bash tools/slurm_sweep.sh PARTITION --config CONFIG --tasks A B ... [--work-root DIR]
# GPUS_PER_TASK=0 runs the tasks on CPUs. Job logs: <work root>/slurm/<job>_<task index>.out
set -euo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: $0 PARTITION BACKBONE_METHOD|--config CONFIG [sweep.py options]"
[ $# -ge 2 ] || { echo "$USAGE" >&2; exit 2; }
for arg in "$@"; do  # the array indexes one method's tasks, the table job reads one work root
  [ "$arg" != "--methods" ] || { echo "$0: one BACKBONE_METHOD per call; submit each method" \
    "on its own (--methods is for tools/sweep.py on one node)" >&2; exit 2; }
done
PARTITION=$1; shift
PYTHON=${PYTHON:-python}
GPUS_PER_TASK=${GPUS_PER_TASK:-1}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SBATCH_ARGS=${SBATCH_ARGS:-""}
read -r NUM_TASKS ROOT < <("$PYTHON" tools/sweep.py "$@" --plan)
mkdir -p "$ROOT/slurm"
GRES=()
[ "$GPUS_PER_TASK" -gt 0 ] && GRES=(--gres=gpu:"$GPUS_PER_TASK")
SWEEP_GPUS=$(( GPUS_PER_TASK > 0 ? GPUS_PER_TASK : 1 ))
SWEEP=$(printf '%q ' "$PYTHON" tools/sweep.py "$@" --gpus "$SWEEP_GPUS")
ARRAY=$(sbatch --parsable -p "$PARTITION" -J "sweep" --array=0-$(( NUM_TASKS - 1 )) \
  --ntasks=1 --cpus-per-task="$CPUS_PER_TASK" "${GRES[@]}" -o "$ROOT/slurm/%A_%a.out" \
  ${SBATCH_ARGS} --wrap "$SWEEP --only-task-index \$SLURM_ARRAY_TASK_ID")
ARRAY=${ARRAY%%;*}
TABLE=$(sbatch --parsable -p "$PARTITION" -J "sweep_table" --dependency=afterany:"$ARRAY" \
  --ntasks=1 --cpus-per-task=1 -o "$ROOT/slurm/%j_table.out" ${SBATCH_ARGS} \
  --wrap "$(printf '%q ' "$PYTHON" tools/vtab_table.py "$ROOT")")
TABLE=${TABLE%%;*}
echo "submitted $NUM_TASKS tasks as array job $ARRAY and the table as job $TABLE (after all" \
  "of them); results and the table under $ROOT, job logs under $ROOT/slurm"
