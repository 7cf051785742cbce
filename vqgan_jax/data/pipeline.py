"""grain input pipeline: augmented training batches and whole evaluation images.

Training (``train_iterator``) per process::

    source[process_index::process_count]  # this process's share of the records
      -> shuffle (seed), repeat forever, reshuffled every epoch
      -> drop undecodable records (counted in ``source.num_skipped``)
      -> random square crop + resize + horizontal flip, RNG from (seed, process, element index)
      -> batches of global_batch_size // process_count

Every random choice depends only on the seed and the element's position in the stream, so
the stream is reproducible and resumes exactly from the iterator's state.

Evaluation reads held-out records in order, every one through :func:`eval_image`: a list of
whole or resized images (``eval_images``) or masked global batches (``image_batches``).
"""

import concurrent.futures
import functools
import math
from collections.abc import Iterator

from absl import logging
import grain
import jax
import numpy as np
from PIL import Image

from vqgan_jax.data.sources import ImageSource

__all__ = ["center_crop_resize", "eval_image", "eval_images", "image_batches", "to_unit_range",
           "train_iterator"]


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 image in [0, 255] -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def _crop_resize(image: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    """Square ``image[top:top+side, left:left+side]`` resized to uint8[size, size, 3].

    PIL's bicubic resize, antialiased when shrinking; upsamples crops smaller than ``size``.
    """
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Central square crop of ``image`` resized to ``size``.

    Args:
      image: uint8[H, W, 3].
      size: output side in pixels.

    Returns:
      float32[size, size, 3] in [-1, 1].
    """
    h, w = image.shape[:2]
    side = min(h, w)
    return to_unit_range(_crop_resize(image, (h - side) // 2, (w - side) // 2, side, size))


CROP_MODES = ("random_resized", "random")


def _augment(record: dict, rng: np.random.Generator, *, image_size: int,
             min_crop_scale: float, crop_mode: str) -> dict[str, np.ndarray]:
    """Random square crop, resized to image_size, random horizontal flip.

    ``random_resized``: side uniform(min_crop_scale, 1) * min(H, W). ``random``: side
    image_size at the image's own resolution (min(H, W) for smaller images, then upsampled).

    Returns ``{"image": float32[image_size, image_size, 3] in [-1, 1], "label": int32[]}``.
    """
    image = record["image"]  # uint8[H, W, 3]
    h, w = image.shape[:2]
    if crop_mode == "random":
        side = min(image_size, h, w)
    else:
        side = max(1, round(rng.uniform(min_crop_scale, 1.0) * min(h, w)))
    top = rng.integers(0, h - side + 1)
    left = rng.integers(0, w - side + 1)
    out = _crop_resize(image, top, left, side, image_size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return {"image": to_unit_range(out), "label": np.int32(record["label"])}


def _has_image(record: dict) -> bool:
    return record["image"] is not None


def train_iterator(source: ImageSource, *, image_size: int, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   min_crop_scale: float = 0.5,
                   crop_mode: str = "random_resized") -> grain.DatasetIterator:
    """Endless iterator over this process's augmented training batches.

    Each process reads the records ``process_index::process_count`` of ``source``, shuffled
    with ``seed`` and reshuffled every epoch; undecodable records are skipped (and counted in
    ``source.num_skipped``). Each image gets a random square crop of side
    ``uniform(min_crop_scale, 1) * min(H, W)`` resized to ``image_size`` (PIL bicubic,
    antialiased; small images are upsampled) and a random horizontal flip, drawn from an RNG
    seeded by (``seed``, process, position in the stream): the stream is a pure function of
    the seed and resumes exactly.

    The iterator checkpoints with orbax (only this process's position is saved)::

        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(it)))
        manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(it)))  # restores ``it`` in place

    or without orbax: ``state = it.get_state()`` (a JSON-able dict) and ``it.set_state(state)``.

    Args:
      source: records ``{"image": uint8[H, W, 3] | None, "label": int, ...}``.
      image_size: side of the output crops.
      global_batch_size: batch size over all processes (``config.batch_size``).
      seed: seeds the shuffle and the augmentation.
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      min_crop_scale: smallest crop side as a fraction of the image's shorter side, in (0, 1].
      crop_mode: ``"random_resized"`` (the above) or ``"random"``: crops of ``image_size``
        pixels at the image's own resolution, no rescaling (for models evaluated on whole
        images at full resolution).

    Returns:
      A ``grain.DatasetIterator`` yielding dicts ``image: float32[B, image_size, image_size, 3]``
      in [-1, 1] and ``label: int32[B]``, with ``B = global_batch_size // process_count``.

    Raises:
      ValueError: if ``global_batch_size`` is not a positive multiple of ``process_count``,
        ``min_crop_scale`` is not in (0, 1], ``crop_mode`` is unknown, or this process's share of ``source`` is empty.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"config.batch_size={global_batch_size} (global) must be a positive "
                         f"multiple of the number of processes ({process_count}).")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"config.crop_mode={crop_mode!r}; use one of {CROP_MODES}.")
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"config.min_crop_scale={min_crop_scale} must be in (0, 1].")
    local_batch_size = global_batch_size // process_count

    ds = grain.MapDataset.source(source)[process_index::process_count]
    if not len(ds):
        raise ValueError(f"{source!r} has {len(source)} records: none left for process "
                         f"{process_index} of {process_count}.")
    # Augmentation differs across processes; the shuffle needs no such care (disjoint shards).
    augment_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    ds = (ds.seed(seed).shuffle().repeat()  # repeat() reshuffles each epoch
          .filter(_has_image)               # undecodable -> None, dropped by to_iter_dataset
          .random_map(functools.partial(_augment, image_size=image_size,
                                        min_crop_scale=min_crop_scale, crop_mode=crop_mode),
                      seed=augment_seed)
          # Reading, decoding and augmenting run in grain's threads (PIL releases the GIL).
          .to_iter_dataset(grain.ReadOptions(prefetch_buffer_size=max(2 * local_batch_size, 16)))
          .batch(local_batch_size, drop_remainder=True))
    return iter(ds)


def eval_image(record: dict, *, image_size: int | None = None, multiple_of: int = 1
               ) -> np.ndarray | None:
    """One held-out record as float32[H', W', 3] in [-1, 1]: with ``image_size``, the central
    square crop resized to it (:func:`center_crop_resize`, the ImageNet protocol); without,
    the whole image center-cropped to the largest height and width divisible by
    ``multiple_of`` (the model's downsampling factor). None for an undecodable record or,
    whole, an image smaller than ``multiple_of``."""
    image = record["image"]  # uint8[H, W, 3] or None
    if image is None or image_size is not None:
        return None if image is None else center_crop_resize(image, image_size)
    h, w = image.shape[:2]
    new_h, new_w = h - h % multiple_of, w - w % multiple_of
    if not (new_h and new_w):
        logging.warning("Skipping %s: %dx%d is smaller than %d.", record.get("path"), h, w,
                        multiple_of)
        return None
    top, left = (h - new_h) // 2, (w - new_w) // 2
    return to_unit_range(image[top:top + new_h, left:left + new_w])


def eval_images(source: ImageSource, *, multiple_of: int = 1, image_size: int | None = None,
                max_images: int | None = None) -> list[np.ndarray]:
    """The first ``max_images`` (default: all) evaluation images of ``source``, in order, as
    :func:`eval_image` makes them (records it refuses are skipped).

    Returns:
      A list of float32[H', W', 3] arrays in [-1, 1] (sizes may differ without ``image_size``).
    """
    images: list[np.ndarray] = []
    for index in range(len(source)):
        if max_images is not None and len(images) >= max_images:
            break
        image = eval_image(source[index], image_size=image_size, multiple_of=multiple_of)
        if image is not None:
            images.append(image)
    return images


def image_batches(source: ImageSource, num_images: int, *, image_size: int, batch_size: int,
                  num_threads: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's rows of each global batch of evaluation images over records
    ``0 .. num_images-1`` (:func:`eval_image` at ``image_size``).

    Global batch ``b`` holds records ``b*batch_size ..``; process ``p`` of ``P`` reads rows
    ``p*L .. (p+1)*L`` of it (``L = batch_size // P``). Records past ``num_images`` and
    undecodable ones are zero images with mask False. Decoding runs in a thread pool, one
    batch ahead.

    Yields:
      ``(float32[L, image_size, image_size, 3] in [-1, 1], bool[L] mask)``.
    """
    local = batch_size // jax.process_count()
    offset = jax.process_index() * local
    blank = np.zeros((image_size, image_size, 3), np.float32)

    def load(index: int) -> tuple[np.ndarray, bool]:
        image = None if index >= num_images else eval_image(source[index], image_size=image_size)
        return (blank, False) if image is None else (image, True)

    def load_batch(b: int) -> tuple[np.ndarray, np.ndarray]:
        rows = list(pool.map(load, range(b * batch_size + offset, b * batch_size + offset + local)))
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])

    num_batches = math.ceil(num_images / batch_size)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as ahead:
        future = ahead.submit(load_batch, 0) if num_batches else None
        for b in range(num_batches):
            batch = future.result()
            if b + 1 < num_batches:
                future = ahead.submit(load_batch, b + 1)
            yield batch
