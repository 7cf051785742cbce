#!/usr/bin/env bash
# Train vqgan_jax on a SLURM GPU cluster: one process per GPU on every node of the allocation.
#
#   sbatch --nodes=4 launch/slurm_gpu.sh                    # from a checkout on shared storage
#   CONFIG=configs/imagenet_f16.py WORKDIR=/shared/runs/f16 FSDP=8 sbatch --nodes=2 launch/slurm_gpu.sh
#   DRY_RUN=1 bash launch/slurm_gpu.sh                      # print the srun command only
#
#SBATCH --job-name=vqgan_jax
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@300
#
# `--signal=TERM@300` asks SLURM for a SIGTERM five minutes before the time limit: the run saves
# a checkpoint at the next step and exits; resubmitting the same command resumes from it.
#
# Variables (defaults in brackets):
#   CONFIG       config file [configs/imagenet_f16.py]
#   WORKDIR      run directory on storage every node sees [runs/<basename of CONFIG>]
#   DATA_DIR     tensorflow_datasets data_dir [unset: the tfds default]
#   BATCH_SIZE   global batch [256]
#   FSDP         config.mesh.fsdp [1]
#   TENSOR       config.mesh.tensor [1] (stage 2 only: splits the GPT's heads and MLP)
#   DTYPE        config.dtype [bfloat16]
#   REMAT        config.model.remat [False]
#   PYTHON       interpreter with vqgan_jax and jax[cuda12] installed [python3]
#   EXTRA        more flags for vqgan_jax.main, e.g. "--config.num_train_steps=1000"
#   DRY_RUN=1    print the srun command instead of running it (no SLURM needed)
#
# Each task runs `python -m vqgan_jax.main --distributed ...` on one GPU (SLURM binds it via
# --gpus-per-task=1): jax.distributed.initialize() reads the coordinator (first node of
# SLURM_STEP_NODELIST), the number of processes (SLURM_NTASKS) and this process's index
# (SLURM_PROCID) from the environment. Each process reads its own share of the data; process
# 0 writes logs and metrics; orbax writes checkpoints to WORKDIR from all processes together.
set -euo pipefail

CONFIG=${CONFIG:-configs/imagenet_f16.py}
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)}
BATCH_SIZE=${BATCH_SIZE:-256}
FSDP=${FSDP:-1}
TENSOR=${TENSOR:-1}
DTYPE=${DTYPE:-bfloat16}
REMAT=${REMAT:-False}
PYTHON=${PYTHON:-python3}
EXTRA=${EXTRA:-}

ARGS=(--distributed "--config=$CONFIG" "--workdir=$WORKDIR"
      "--config.batch_size=$BATCH_SIZE" "--config.mesh.fsdp=$FSDP"
      "--config.mesh.tensor=$TENSOR" "--config.dtype=$DTYPE" "--config.model.remat=$REMAT")
if [[ -n "${DATA_DIR:-}" ]]; then ARGS+=("--config.data_dir=$DATA_DIR"); fi
# shellcheck disable=SC2206  # EXTRA is meant to split into several flags
ARGS+=($EXTRA)

# XLA may take most of each GPU's memory up front (the default, 75%) or grow on demand.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

CMD=(srun --gpus-per-task=1 --kill-on-bad-exit=1 "$PYTHON" -m vqgan_jax.main "${ARGS[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  cd "${SLURM_SUBMIT_DIR:-.}"
  "${CMD[@]}"
fi
