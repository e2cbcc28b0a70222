# Shared by tools/slurm_train.sh and tools/slurm_test.sh (sourced): the srun resources
# from GPUS, GPUS_PER_NODE, CPUS_PER_TASK, and the launcher. mmengine's Slurm start-up
# reads SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST and MASTER_PORT (from PORT).
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
export MASTER_PORT=${PORT:-29500}
if [ "$GPUS" -gt 0 ]; then
  SRUN_RES=(--gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE"
            --cpus-per-task="$CPUS_PER_TASK")
  LAUNCHER=slurm
else  # one CPU task; mmengine's Slurm start-up needs a GPU per task
  SRUN_RES=(--ntasks=1 --cpus-per-task="$CPUS_PER_TASK")
  LAUNCHER=none
fi
