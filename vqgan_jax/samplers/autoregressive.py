"""Jitted sampling of code grids from a :class:`~vqgan_jax.models.gpt.GPT` (Esser et al. 2021,
sec. 3.2 and 4.1 for the sliding window; Holtzman et al. 2020 for top-p; Ho & Salimans 2021 for
classifier-free guidance, its scale scheduled over the codes by
:class:`~vqgan_jax.samplers.guidance.GuidanceSchedule`).

Every sampler has fixed shapes and one ``lax.fori_loop`` over code positions, so it compiles
once per (model, batch size, prefix length, grid) and then runs without the host:

* :func:`sample` with ``use_cache=True`` writes the prefix into a KV cache in one call, then
  feeds one code a step (O(T) work per code);
* :func:`sample` with ``use_cache=False`` recomputes the whole fixed-length sequence every step
  (O(T^2) per code): the reference the cache is tested and benchmarked against;
* :func:`sample_sliding_window` samples grids larger than the training grid, predicting each
  code from a training-grid-sized window of codes around it, clipped at the borders (taming's
  high-resolution scheme).

The random key of the code at flat position ``n`` is ``fold_in(rng, n)`` in all three, so for
the same seed they draw the same codes wherever their logits agree.

:func:`sample_images` (:func:`draw_images` traced) decodes them with the frozen tokenizer.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models import registry
from vqgan_jax.models.gpt import GPT
from vqgan_jax.samplers.guidance import GuidanceSchedule, guide
from vqgan_jax.state.transformer import StepConfig


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0,
                  temperature: float | jax.Array = 1.0) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) filtering of next-code logits.

    Args:
      logits: float[..., V].
      top_k: keep the ``top_k`` largest logits (ties at the k-th value are all kept); 0 or
        ``>= V`` keeps all. Static (a Python int).
      top_p: keep the smallest set of most probable codes whose probability mass reaches
        ``top_p`` (the most probable code is always kept; codes tied with the least probable
        kept one are kept too); 1.0 keeps all. In (0, 1]. Static (a Python float).
      temperature: divides the logits; > 0.

    Returns:
      float32[..., V]: the scaled logits with filtered-out entries at -inf.
    """
    logits = logits.astype(jnp.float32) / temperature
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if isinstance(top_p, (int, float)) and top_p >= 1.0:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # Kept: the codes before which the mass of the more probable codes has not reached p; the
    # least probable of them sets a logit threshold (no scatter back to vocabulary order).
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    keep = logits >= cutoff
    return jnp.where(keep, logits, -jnp.inf)


def _draw(rng, n, logits, top_k, top_p, temperature):
    return jax.random.categorical(jax.random.fold_in(rng, n),
                                  filter_logits(logits, top_k, top_p, temperature)).astype(jnp.int32)


def _with_null_rows(prefix: jax.Array, null_prefix: jax.Array | None, guidance_scale: float
                    ) -> tuple[jax.Array, jax.Array | None]:
    """For classifier-free guidance: ``prefix`` with the ``null_prefix`` rows appended (the
    unconditional half of the batch) and the scale as float32[]; unchanged and None without."""
    if null_prefix is None:
        return prefix, None
    return (jnp.concatenate([prefix, null_prefix], axis=0),
            jnp.asarray(guidance_scale, jnp.float32))


def _scale_of(scale: jax.Array | None, num_codes: int, kind: str, power: float,
              interval: tuple[float, float]):
    """A function of ``n``: the guidance scale of code ``n`` (progress ``n / (num_codes - 1)``;
    0 for a single code), or None without guidance. Validates the schedule either way."""
    schedule = GuidanceSchedule(kind, 1.0 if scale is None else scale, power, interval)
    if scale is None:
        return lambda n: None
    last = max(num_codes - 1, 1)
    return lambda n: schedule.scale_at(jnp.asarray(n, jnp.float32) / last)


def _check(gpt: GPT, prefix: jax.Array, num_codes: int, null_prefix: jax.Array | None):
    p = prefix.shape[1]
    if p < 1:
        raise ValueError("The prefix needs at least one token (the start or class token).")
    if p + num_codes - 1 > gpt.block_size:
        raise ValueError(f"A prefix of {p} tokens and {num_codes} codes need block_size >= "
                         f"{p + num_codes - 1}; the model has block_size={gpt.block_size}.")
    if null_prefix is not None and null_prefix.shape != prefix.shape:
        raise ValueError(f"null_prefix has shape {null_prefix.shape}; it must match the "
                         f"prefix's {prefix.shape} (one null token sequence per sample).")


_GUIDANCE_STATIC = ("guidance_schedule", "guidance_power", "guidance_interval")


@functools.partial(jax.jit, static_argnames=("gpt", "num_codes", "top_k", "top_p", "use_cache")
                   + _GUIDANCE_STATIC)
def sample(params: Any, prefix: jax.Array, rng: jax.Array, *, gpt: GPT, num_codes: int,
           top_k: int = 0, top_p: float = 1.0,
           temperature: float | jax.Array = 1.0, null_prefix: jax.Array | None = None,
           guidance_scale: float | jax.Array = 1.0, use_cache: bool = True,
           guidance_schedule: str = "constant", guidance_power: float = 1.0,
           guidance_interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Sample ``num_codes`` codes after ``prefix``, autoregressively, under one jit.

    Args:
      params: the GPT's parameters.
      prefix: int32[B, P], P >= 1: the conditioning tokens (start token, class token, or
        condition codes; see ``trainers.transformer.Conditioner``), any batch size B.
      rng: a ``jax.random.key``; the same key gives the same codes.
      gpt: the model (static). Needs ``block_size >= P + num_codes - 1``.
      num_codes: codes to sample (h * w of the grid).
      top_k, top_p, temperature: see :func:`filter_logits` (top_k and top_p are static: each
        value compiles once; temperature is traced).
      null_prefix: int32[B, P], the unconditional prefix (null class) for classifier-free
        guidance; None disables guidance.
      guidance_scale: s in ``u + s * (c - u)`` (Ho & Salimans 2021); 1 gives the conditional
        model, 0 the unconditional one. Used only with ``null_prefix``. Traced.
      use_cache: KV cache (fast) or full recomputation every step (reference).
      guidance_schedule, guidance_power, guidance_interval: the ``kind``, ``power`` and
        ``interval`` of the :class:`~vqgan_jax.samplers.guidance.GuidanceSchedule` that sets
        the scale of code ``n`` at progress ``n / (num_codes - 1)``: ``"constant"`` (default,
        ``guidance_scale`` for every code), ``"linear"`` (1 at the first code, the scale at the
        last), ``"power_cosine"``, ``"interval"``. Static (hashable: the interval a tuple).

    Returns:
      int32[B, num_codes] in ``[0, gpt.vocab_size)``, row-major over the grid.

    Raises:
      ValueError: if the sequence does not fit ``block_size``, the prefixes disagree, or the
        guidance schedule is invalid (naming the field).
    """
    _check(gpt, prefix, num_codes, null_prefix)
    b, p = prefix.shape
    prefix, scale = _with_null_rows(prefix, null_prefix, guidance_scale)
    scale_of = _scale_of(scale, num_codes, guidance_schedule, guidance_power, guidance_interval)
    draw = functools.partial(_draw, rng, top_k=top_k, top_p=top_p, temperature=temperature)
    codes = jnp.zeros((b, num_codes), jnp.int32)

    def twice(c):  # the same codes for the conditional and unconditional halves
        return c if scale is None else jnp.concatenate([c, c], axis=0)

    if use_cache:
        logits, cache = gpt.apply({"params": params}, prefix, gpt.init_cache(prefix.shape[0]), 0)
        codes = codes.at[:, 0].set(draw(0, logits=guide(logits[:, -1], scale_of(0))))

        def step(n, carry):  # feed code n-1 at position p+n-2, draw code n
            codes, cache = carry
            token = twice(jax.lax.dynamic_slice_in_dim(codes, n - 1, 1, axis=1))
            logits, cache = gpt.apply({"params": params}, token, cache, p + n - 1)
            code = draw(n, logits=guide(logits[:, 0], scale_of(n)))
            return codes.at[:, n].set(code), cache

        codes, _ = jax.lax.fori_loop(1, num_codes, step, (codes, cache))
        return codes

    def step(n, codes):  # the whole sequence every time; causality hides the unsampled tail
        tokens = jnp.concatenate([prefix, twice(codes)[:, :-1]], axis=1)
        logits, _ = gpt.apply({"params": params}, tokens)
        last = jax.lax.dynamic_slice_in_dim(logits, p + n - 1, 1, axis=1)[:, 0]
        return codes.at[:, n].set(draw(n, logits=guide(last, scale_of(n))))

    return jax.lax.fori_loop(0, num_codes, step, codes)


def window_start(i: jax.Array, size: int, window: int) -> jax.Array:
    """First row (or column) of the ``window``-long span centred on ``i``, clipped to [0, size)."""
    return jnp.clip(i - window // 2, 0, size - window)


@functools.partial(jax.jit, static_argnames=("gpt", "grid", "height", "width", "top_k", "top_p")
                   + _GUIDANCE_STATIC)
def sample_sliding_window(params: Any, prefix: jax.Array, rng: jax.Array, *, gpt: GPT,
                          grid: tuple[int, int], height: int, width: int, top_k: int = 0,
                          top_p: float = 1.0, temperature: float | jax.Array = 1.0,
                          null_prefix: jax.Array | None = None,
                          guidance_scale: float | jax.Array = 1.0,
                          guidance_schedule: str = "constant", guidance_power: float = 1.0,
                          guidance_interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Sample a ``height x width`` code grid from a model trained on ``grid`` (Esser et al. 2021,
    sec. 4.1, fig. 3; taming's ``sample_conditional`` sliding window).

    Codes are drawn in raster order. Code (i, j) is predicted from the window of ``grid`` codes
    whose top-left corner is ``(clip(i - gh//2, 0, height - gh), clip(j - gw//2, 0, width - gw))``:
    the model sees the prefix, then the window's codes in raster order up to (i, j), at the
    positions it was trained on. Each code costs one forward pass over the window (no cache:
    the window moves). With ``(height, width) == grid`` the window never moves, and this is
    :func:`sample` with ``use_cache=False``.

    Args:
      params, prefix, rng, gpt, top_k, top_p, temperature, null_prefix, guidance_scale,
      guidance_schedule, guidance_power, guidance_interval: as in :func:`sample` (the progress
        of code ``n`` in raster order is ``n / (height * width - 1)``); the prefix must not
        depend on the position (start or class token).
      grid: (gh, gw), the training code grid; ``P + gh * gw - 1 <= gpt.block_size``.
      height, width: the output grid in codes, ``>= gh`` and ``>= gw``.

    Returns:
      int32[B, height, width] in ``[0, gpt.vocab_size)``.

    Raises:
      ValueError: if the output grid is smaller than ``grid`` or the window does not fit.
    """
    gh, gw = grid
    if height < gh or width < gw:
        raise ValueError(f"height x width = {height}x{width} codes is smaller than the training "
                         f"grid {gh}x{gw}; use sample() for grids up to the training grid.")
    _check(gpt, prefix, gh * gw, null_prefix)
    b, p = prefix.shape
    prefix, scale = _with_null_rows(prefix, null_prefix, guidance_scale)
    scale_of = _scale_of(scale, height * width, guidance_schedule, guidance_power,
                         guidance_interval)
    draw = functools.partial(_draw, rng, top_k=top_k, top_p=top_p, temperature=temperature)

    def step(n, codes):
        i, j = n // width, n % width
        top, left = window_start(i, height, gh), window_start(j, width, gw)
        window = jax.lax.dynamic_slice(codes, (0, top, left), (b, gh, gw)).reshape(b, gh * gw)
        if scale is not None:
            window = jnp.concatenate([window, window], axis=0)
        tokens = jnp.concatenate([prefix, window[:, :-1]], axis=1)
        logits, _ = gpt.apply({"params": params}, tokens)
        local = (i - top) * gw + (j - left)
        last = jax.lax.dynamic_slice_in_dim(logits, p + local - 1, 1, axis=1)[:, 0]
        code = draw(n, logits=guide(last, scale_of(n)))
        return jax.lax.dynamic_update_slice(codes, code[:, None, None], (0, i, j))

    return jax.lax.fori_loop(0, height * width, step, jnp.zeros((b, height, width), jnp.int32))


# ----------------------------------------------------------------------------- images

def image_grid(images: np.ndarray, rows: int, gap: int = 2) -> np.ndarray:
    """uint8[N, H, W, 3], N a multiple of ``rows`` -> one uint8 picture, row-major, white gaps."""
    n, h, w, _ = images.shape
    cols = n // rows
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = images[k]
    return out


def draw_images(params: Any, frozen: dict[str, Any], sc: StepConfig, prefix: jax.Array,
                rng: jax.Array, *, height: int, width: int, top_k: int = 0, top_p: float = 1.0,
                temperature: float | jax.Array = 1.0,
                guidance_scale: float | jax.Array | None = None,
                guidance_schedule: str = "constant", guidance_power: float = 1.0,
                guidance_interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Sample code grids after ``prefix`` and decode them with the frozen tokenizer (traceable:
    the body that :func:`sample_images` and :class:`vqgan_jax.api.Generator` jit).

    Args:
      height, width: the code grid, at least the training grid ``sc.grid``; larger grids use
        the sliding window (:func:`sample_sliding_window`).
      guidance_scale: classifier-free guidance scale (class mode); None: no guidance.
      guidance_schedule, guidance_power, guidance_interval: as :func:`sample` (static).
      The rest: as :func:`sample_images`.

    Returns:
      float32[B, height * f, width * f, 3] in [-1, 1].
    """
    gh, gw = sc.grid
    b = prefix.shape[0]
    null = None if guidance_scale is None else sc.conditioning.null_prefix(b)
    kw = dict(gpt=sc.gpt, top_k=top_k, top_p=top_p, temperature=temperature, null_prefix=null,
              guidance_scale=1.0 if guidance_scale is None else guidance_scale,
              guidance_schedule=guidance_schedule, guidance_power=guidance_power,
              guidance_interval=guidance_interval)
    if (height, width) == (gh, gw):
        codes = sample(params, prefix, rng, num_codes=gh * gw, **kw).reshape(b, gh, gw)
    else:
        codes = sample_sliding_window(params, prefix, rng, grid=sc.grid, height=height,
                                               width=width, **kw)
    x = sc.vq.apply({"params": frozen["tokenizer"]}, codes, method="decode_from_indices")
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def check_sampling_args(sc: StepConfig, height: int, width: int, guidance_scale: float,
                        guidance_schedule: str = "constant", guidance_power: float = 1.0,
                        guidance_interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """Raise before any compile for a grid or guidance the model cannot sample.

    Raises:
      ValueError: for a grid smaller than the training grid, guidance outside class mode, a
        sliding window in image mode (the condition would have to slide too), or an invalid
        guidance schedule (naming its field).
    """
    GuidanceSchedule(guidance_schedule, guidance_scale, guidance_power, guidance_interval)
    gh, gw = sc.grid
    if height < gh or width < gw:
        raise ValueError(f"height x width = {height}x{width} codes is smaller than the training "
                         f"grid {gh}x{gw}; sample at least the training grid.")
    if guidance_scale != 1.0 and sc.conditioning.kind != "class":
        raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model "
                         "(trained with config.class_drop_prob > 0); leave it at 1.0.")
    if (height, width) != (gh, gw) and sc.conditioning.kind == "image":
        raise ValueError("Sliding-window sampling (height/width beyond the training grid) "
                         "supports unconditional and class-conditional models only.")


_draw_images = jax.jit(draw_images, static_argnames=("sc", "height", "width", "top_k", "top_p")
                       + _GUIDANCE_STATIC)


def sample_images(params: Any, frozen: dict[str, Any], sc: StepConfig, prefix: jax.Array,
                  rng: jax.Array, *, height: int | None = None, width: int | None = None,
                  top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                  guidance_scale: float = 1.0, guidance_schedule: str = "constant",
                  guidance_power: float = 1.0,
                  guidance_interval: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Sample code grids after ``prefix`` and decode them with the frozen tokenizer.

    Args:
      params: GPT parameters; frozen: as :func:`vqgan_jax.state.transformer.load_frozen`
        returns; sc: the step config.
      prefix: int32[B, P] (:class:`vqgan_jax.models.registry.Conditioning` builds them).
      rng: a ``jax.random.key``.
      height, width: the code grid (default: the training grid). Larger grids use the sliding
        window (:func:`sample_sliding_window`); smaller ones raise.
      top_k, top_p, temperature: see :func:`filter_logits`.
      guidance_scale: classifier-free guidance (class mode only); 1 disables it (under every
        schedule).
      guidance_schedule, guidance_power, guidance_interval: the scale's schedule over the
        codes, as :func:`sample`.

    Returns:
      float32[B, height * f, width * f, 3] in [-1, 1].

    Raises:
      ValueError: as :func:`check_sampling_args`.
    """
    height, width = height or sc.grid[0], width or sc.grid[1]
    check_sampling_args(sc, height, width, guidance_scale, guidance_schedule, guidance_power,
                        guidance_interval)
    return np.asarray(_draw_images(
        params, frozen, sc, prefix, rng, height=height, width=width, top_k=top_k, top_p=top_p,
        temperature=temperature, guidance_scale=None if guidance_scale == 1.0 else guidance_scale,
        guidance_schedule=guidance_schedule, guidance_power=float(guidance_power),
        guidance_interval=tuple(float(v) for v in guidance_interval)))


def check_class_ids(kind: str, num_classes: int, class_ids: list[int]) -> None:
    """The class ids a model of conditioning ``kind`` ("unconditional" | "class" | "image")
    with ``num_classes`` classes samples (shared by the GPT's and MaskGIT's row helpers).

    Raises:
      ValueError: naming class_ids for ids outside [0, num_classes), none for a class model, or
        ids given to a model that is not class-conditional.
    """
    if kind == "unconditional":
        if class_ids:
            raise ValueError(f"class_ids={list(class_ids)} was given but the model is "
                             "unconditional; leave class_ids out.")
        return
    if kind != "class":
        raise ValueError("This model is image-conditional: sampling by class ids does not apply; "
                         "encode a condition image with the cond-stage tokenizer, build the "
                         "prefix with Conditioning.image_prefix and call sample_images.")
    bad = [c for c in class_ids if not 0 <= c < num_classes]
    if bad or not class_ids:
        raise ValueError(f"class_ids={list(class_ids)}: give class ids in [0, {num_classes}).")


def class_rows(conditioning: registry.Conditioning, class_ids: list[int], num: int) -> jax.Array:
    """Prefixes for ``num`` samples of each class in ``class_ids`` (unconditional: ``num`` in all).

    Raises:
      ValueError: as :func:`check_class_ids`.
    """
    check_class_ids(conditioning.kind, conditioning.num_classes, class_ids)
    if conditioning.kind == "unconditional":
        return conditioning.sos_prefix(num)
    return conditioning.class_prefix(jnp.repeat(jnp.asarray(class_ids), num))
