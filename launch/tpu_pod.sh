#!/usr/bin/env bash
# Train a vqgan_jax tokenizer on a Cloud TPU pod slice: create the TPU VM (unless it exists),
# install the package on every worker, then start the same training command on all of them.
#
#   TPU=my-pod ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=my-bucket launch/tpu_pod.sh
#
# Variables (defaults in brackets):
#   TPU          TPU VM name (required)
#   ZONE         GCP zone (required)
#   BUCKET       GCS bucket holding tensorflow_datasets/ and receiving runs/ (required)
#   ACCELERATOR  accelerator type used when the VM is created [v4-32]
#   RUNTIME      TPU software version used when the VM is created [tpu-ubuntu2204-base]
#   REPO         git URL of vqgan_jax [the origin of this checkout]
#   CONFIG       config file [configs/imagenet_f16.py]
#   RUN          run name under gs://$BUCKET/runs/ [basename of CONFIG]
#   BATCH_SIZE   global batch [256]
#   FSDP         config.mesh.fsdp [1]
#   EXTRA        more flags for vqgan_jax.main, e.g. "--config.num_train_steps=1000"
#   DRY_RUN=1    print the gcloud commands instead of running them
#
# Every worker runs `python -m vqgan_jax.main --distributed ...`: jax.distributed.initialize()
# finds the other workers from the TPU metadata, each process reads its own share of the data,
# and orbax writes the checkpoints to the gs:// workdir from all hosts together. Re-running the
# script resumes from the latest checkpoint there.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the GCP zone}"
: "${BUCKET:?set BUCKET to a GCS bucket (without gs://)}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO=${REPO:-$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || echo "")}
CONFIG=${CONFIG:-configs/imagenet_f16.py}
RUN=${RUN:-$(basename "$CONFIG" .py)}
BATCH_SIZE=${BATCH_SIZE:-256}
FSDP=${FSDP:-1}
EXTRA=${EXTRA:-}
: "${REPO:?set REPO to the git URL of vqgan_jax}"

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ "${DRY_RUN:-0}" == 1 ]] || ! gcloud compute tpus tpu-vm describe "$TPU" --zone="$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi

# Each remote command is one line: a newline would end it there.
SETUP="set -e; [ -d vqgan_jax ] || git clone $REPO vqgan_jax; cd vqgan_jax && git pull --ff-only"
SETUP+=" && python3 -m pip install -q -e . 'jax[tpu]' tensorflow gcsfs"
TRAIN="cd vqgan_jax && python3 -m vqgan_jax.main --distributed --config=$CONFIG"
TRAIN+=" --workdir=gs://$BUCKET/runs/$RUN --config.data_dir=gs://$BUCKET/tensorflow_datasets"
TRAIN+=" --config.batch_size=$BATCH_SIZE --config.mesh.fsdp=$FSDP $EXTRA"

run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$SETUP"
run gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$TRAIN"
