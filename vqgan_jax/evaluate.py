"""Evaluate a workdir: ``python -m vqgan_jax.evaluate --workdir=DIR --split=validation``.

A stage-2 workdir (a GPT's or a MaskGIT's) is scored instead by sampling ``--num_samples``
images with the sampling flags (``--top_k``, ``--temperature``, ``--guidance_scale`` and its
schedule; ``--top_p`` for a GPT, ``--num_steps`` and ``--choice_temperature`` for a MaskGIT):
``fid`` against ``--ref_stats`` and ``inception_score`` (see
:func:`vqgan_jax.scoring.evaluate_samples`).

Keeps each evaluation in ``DIR/eval/step_<step>_<split>_<protocol>.json`` (psnr, ssim, lpips,
codebook_usage, perplexity, rfid with ``--inception_weights``, and the protocol), listed in
``DIR/eval/index.json``; ``DIR/eval.json`` and ``DIR/eval_reconstructions.png`` hold the latest.
The newest intact checkpoint is evaluated; a workdir with none ends with that message. With
``--write_ref_stats=PATH`` (and no workdir) it instead saves the Inception statistics of the
dataset split for reuse as ``--ref_stats``. See :mod:`vqgan_jax.scoring`.
"""

from absl import app, flags, logging

from vqgan_jax import sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a `python -m vqgan_jax.main` run.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "'demo', 'folder:/path/to/images' or a TFDS name (imagenet2012); default: "
    "the training config's.")
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split to evaluate on.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the training "
                                "config's, else TFDS's default).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Evaluate the first N records of the "
                                   "split (default: the whole split).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Side of the center-cropped evaluation "
                                   "images (256: the ImageNet protocol).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size, a multiple of the "
                                   "device count.")
_INCEPTION = flags.DEFINE_string(
    "inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (needs "
    "torch) or an .npz of its state_dict; without it rFID is left out.")
_REF_STATS = flags.DEFINE_string("ref_stats", None, "Inception statistics (.npz) of the same "
                                 "images, written by --write_ref_stats: rFID reuses them.")
_WRITE_REF_STATS = flags.DEFINE_string(
    "write_ref_stats", None, "Write the Inception statistics of --dataset/--split to this .npz "
    "and exit (no --workdir needed).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50_000, "Stage-2 workdirs: images to sample "
                                    "for FID and Inception Score.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "first (multi-host).")


def main(argv):
    from vqgan_jax import console, workdir
    console.quiet_logs()  # other libraries' INFO logs only with --verbosity=1
    with workdir.exit_on_error():
        _main(argv)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax
    from vqgan_jax import scoring
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    common = dict(split=_SPLIT.value, data_dir=_DATA_DIR.value, num_images=_NUM_IMAGES.value,
                  image_size=_IMAGE_SIZE.value, batch_size=_BATCH_SIZE.value)
    if _WRITE_REF_STATS.value:
        if not (_DATASET.value and _INCEPTION.value):
            raise app.UsageError("--write_ref_stats needs --dataset and --inception_weights.")
        scoring.write_reference_stats(_WRITE_REF_STATS.value, dataset=_DATASET.value,
                                      inception_weights=_INCEPTION.value, **common)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (or --write_ref_stats to write reference "
                             "statistics).")
    from vqgan_jax import workdir
    if workdir.read_config(_WORKDIR.value, "--workdir").stage in ("transformer", "maskgit"):
        if not _INCEPTION.value:
            raise app.UsageError("A stage-2 workdir is scored by FID and Inception Score: pass "
                                 "--inception_weights (and --ref_stats for FID).")
        report = scoring.evaluate_samples(
            _WORKDIR.value, num_samples=_NUM_SAMPLES.value, inception_weights=_INCEPTION.value,
            ref_stats=_REF_STATS.value, batch_size=_BATCH_SIZE.value, **sampling_flags.values())
        logging.info("Evaluation: %s", {k: v for k, v in report.items() if k != "protocol"})
        return
    report = scoring.evaluate_workdir(
        _WORKDIR.value, dataset=_DATASET.value, inception_weights=_INCEPTION.value,
        ref_stats=_REF_STATS.value, step=_STEP.value, **common)
    logging.info("Evaluation: %s", {k: v for k, v in report.items() if k != "protocol"})


if __name__ == "__main__":
    app.run(main)
