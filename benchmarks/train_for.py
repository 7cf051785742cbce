"""Train a tokenizer config for a wall-clock budget, then score it on its held-out images.

    python benchmarks/train_for.py --config=configs/demo.py --workdir=DIR --seconds=120 \
        --config.loss.perceptual_weight=1 --disc_start_fraction=0.5

What a few minutes of a given machine buy (the accelerator check's ``demo`` parts run it on a
GPU; the CPU demo's figures are in the README):

1. times the config's full step (LPIPS and the discriminator on; benchmarks/stage1_step.py) at
   the config's batch, fed by the config's own input pipeline as the trainer feeds it (the
   next batch made and put on the mesh, the step dispatched): ``--calibration_steps`` steps
   after one warm-up. Whichever is slower, the pipeline or the device, sets that time (on an
   H200 the 64x64 demo's step alone took 11.5 ms, the run ~24 ms a step);
2. sets ``num_train_steps`` to the steps that fit ``--seconds`` at that speed (so the learning
   rate schedule ends where the run ends), ``loss.disc_start`` to ``--disc_start_fraction`` of
   them and ``optimizer.warmup_steps`` to at most a tenth of them;
3. trains in ``--workdir`` with :func:`vqgan_jax.trainers.tokenizer.train_and_evaluate`, whose
   final evaluation writes ``metrics.json`` and ``reconstructions.png`` (held-out originals |
   reconstructions); ``--copy_reconstructions=PATH`` copies the picture there.

The steps before ``disc_start`` run the cheaper generator-only step, so a run ends before
``--seconds`` of training. The last line printed is a JSON object: ``num_train_steps``,
``disc_start``, ``calibration_step_ms``, ``train_s`` (the trainer's wall time, compile and
final evaluation included), the held-out ``metrics`` (psnr in dB, ssim, lpips, codebook_usage
as a fraction, perplexity), ``image_size``, ``batch_size``, ``device``, ``workdir``.
"""

import json
import os
import shutil
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import stage1_step
from vqgan_jax import console, parallel
from vqgan_jax.data import pipeline, sources
from vqgan_jax.trainers import tokenizer as T

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Tokenizer config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run (must not hold one).")
_SECONDS = flags.DEFINE_float("seconds", 120.0, "Training budget in seconds (steps x the "
                              "calibrated full step).")
_DISC_FRACTION = flags.DEFINE_float("disc_start_fraction", 0.5, "disc_start as a fraction of "
                                    "the run's steps (0: from the start; 1: never).")
_CALIBRATION = flags.DEFINE_integer("calibration_steps", 20, "Timed steps of the calibration.")
_COPY = flags.DEFINE_string("copy_reconstructions", None, "Copy reconstructions.png here.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    console.quiet_logs()
    config = _CONFIG.value
    if not 0.0 <= _DISC_FRACTION.value <= 1.0:
        raise app.UsageError(f"--disc_start_fraction={_DISC_FRACTION.value}: give a fraction "
                             "in [0, 1].")
    if _SECONDS.value <= 0 or _CALIBRATION.value < 1:
        raise app.UsageError("--seconds and --calibration_steps must be positive.")
    if os.path.exists(os.path.join(_WORKDIR.value, "checkpoints")):
        raise app.UsageError(f"--workdir={_WORKDIR.value} already holds a run: give a new one "
                             "(this benchmark sizes a fresh run).")

    s = stage1_step.setup(config.copy_and_resolve_references())  # sets its copy's disc_start=0
    compiled = stage1_step.compile_step(s, stage1_step.full_step(s), "calibration step")
    batches = pipeline.train_iterator(
        sources.get_source(config.dataset, config.train_split, data_dir=config.data_dir),
        image_size=config.image_size, global_batch_size=config.batch_size, seed=config.seed,
        min_crop_scale=config.min_crop_scale, crop_mode=config.crop_mode)

    def step(state):  # as loop.run_job does it: make the batch, put it on the mesh, dispatch
        batch = parallel.global_batch({"image": next(batches)["image"]}, s.mesh)
        return compiled(state, batch, s.lpips_params)

    step_s, _ = stage1_step.time_steps(step, s.state, _CALIBRATION.value)
    del s, compiled, batches

    steps = max(1, int(_SECONDS.value / step_s))
    config.num_train_steps = steps
    config.loss.disc_start = int(round(_DISC_FRACTION.value * steps))
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.checkpoint_every_steps = steps
    config.eval_every_steps = steps
    config.log_every_steps = max(1, min(config.log_every_steps, steps // 10))
    t0 = time.perf_counter()
    held_out = T.train_and_evaluate(config, _WORKDIR.value)
    train_s = time.perf_counter() - t0
    if _COPY.value:
        shutil.copyfile(os.path.join(_WORKDIR.value, "reconstructions.png"), _COPY.value)
    print(json.dumps(dict(
        num_train_steps=steps, disc_start=config.loss.disc_start,
        calibration_step_ms=round(1e3 * step_s, 3), train_s=round(train_s, 1),
        metrics={k: float(v) for k, v in held_out.items()}, image_size=config.image_size,
        batch_size=config.batch_size, perceptual_weight=config.loss.perceptual_weight,
        device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
        workdir=_WORKDIR.value)))


if __name__ == "__main__":
    app.run(main)
