#!/usr/bin/env bash
# SLURM, one task per node with all its GPUs; jax.distributed.initialize() reads SLURM's env.
#   sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/slurm_gpu.sh CONFIG WORKDIR [overrides]
set -euo pipefail
config=$1; workdir=$2; shift 2
srun python -m haf_jax.train --config="$config" --workdir="$workdir" "$@"
