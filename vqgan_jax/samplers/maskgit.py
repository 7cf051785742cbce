"""Iterative parallel decoding of a :class:`~vqgan_jax.models.maskgit.MaskGIT` (Chang et al.
2022, "MaskGIT", sec. 3.2; the released ``maskgit/libml/parallel_decode.py``).

The grid starts fully masked. At step ``t`` of ``T`` the model predicts every position, a code
is sampled at every masked one, and each sampled code is scored by its log-probability plus
Gumbel noise scaled by ``choice_temperature * (1 - (t + 1) / T)`` ("randomness annealing").
The cosine schedule (sec. 3.3, eq. 3) sets how many positions stay masked after the step,
:func:`masked_after_step`; the most confident new codes are kept, the others masked again.
Kept codes never change. With classifier-free guidance (Ho & Salimans 2021) the model runs on a
doubled batch ``[cond; null]`` and the logits are mixed by :func:`~vqgan_jax.samplers.guidance.guide`
at the scale a :class:`~vqgan_jax.samplers.guidance.GuidanceSchedule` gives for the step's
progress ``t / (T - 1)`` (MUSE, Chang et al. 2023, raises it linearly).

The sampler has fixed shapes and one ``lax.fori_loop`` over the steps: it compiles once per
(model, batch size, num_steps, top_k, guidance kind) and runs without the host.

:func:`sample_images` (:func:`draw_images` traced) decodes the codes with the frozen tokenizer;
:func:`class_rows` builds the class (or null) tokens of a batch, :func:`check_sampling_args`
refuses what a MaskGIT cannot sample before anything compiles.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models.maskgit import MaskGIT
from vqgan_jax.samplers.autoregressive import check_class_ids, filter_logits
from vqgan_jax.samplers.guidance import GuidanceSchedule, guide
from vqgan_jax.state.maskgit import StepConfig


def masked_after_step(t: int, num_steps: int, num_codes: int) -> int:
    """Positions still masked after step ``t`` (0-based) of ``num_steps``, out of ``num_codes``.

    The cosine schedule of Chang et al. 2022 (eq. 3, ``gamma(r) = cos(pi / 2 * r)``):
    ``floor(N * cos(pi / 2 * (t + 1) / T))``, at least 1 while ``t < T - 1``, at most the count
    after the previous step minus 1 (each step fills at least one position), and 0 after the
    last step. With ``T <= N`` these bounds never conflict (``N cos(pi/2 (t+1)/T) >= T-1-t``).

    Args:
      t: the step, in ``[0, num_steps)``.
      num_steps: T, in ``[1, num_codes]``.
      num_codes: N, the positions of the grid.

    Returns:
      int in ``[0, N - t - 1]``; strictly decreasing in ``t``.

    Raises:
      ValueError: naming the argument when ``num_steps`` is outside ``[1, num_codes]`` or ``t``
        outside ``[0, num_steps)``.
    """
    if not 1 <= num_steps <= num_codes:
        raise ValueError(f"num_steps={num_steps}: give 1 <= num_steps <= {num_codes} (the grid's "
                         "codes; each step fills at least one).")
    if not 0 <= t < num_steps:
        raise ValueError(f"t={t}: steps are numbered 0 to num_steps - 1 = {num_steps - 1}.")
    masked = num_codes
    for s in range(t + 1):
        if s == num_steps - 1:
            return 0
        cosine = math.floor(num_codes * math.cos(math.pi / 2 * (s + 1) / num_steps))
        masked = min(max(cosine, 1), masked - 1)
    return masked


def _check(model: MaskGIT, cond_tokens: Any, num_steps: int, top_k: int, temperature: Any,
           choice_temperature: Any, guidance: GuidanceSchedule, null_tokens: Any) -> None:
    shape = jnp.shape(cond_tokens)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"cond_tokens has shape {shape}; give int32[B], one class token "
                         "(model.class_tokens(ids)) or model.null_token per sample.")
    if null_tokens is not None and jnp.shape(null_tokens) != shape:
        raise ValueError(f"null_tokens has shape {jnp.shape(null_tokens)}; it must match "
                         f"cond_tokens' {shape} (model.null_token per sample).")
    if not 1 <= num_steps <= model.seq_len:
        raise ValueError(f"num_steps={num_steps}: give 1 <= num_steps <= seq_len="
                         f"{model.seq_len} (each step fills at least one code).")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: give an int >= 0 (0 keeps all codes).")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature={temperature}: give a temperature > 0.")
    if isinstance(choice_temperature, (int, float)) and not choice_temperature >= 0:
        raise ValueError(f"choice_temperature={choice_temperature}: give a value >= 0 "
                         "(0 keeps the most probable codes; MaskGIT uses 4.5).")
    if not isinstance(guidance, GuidanceSchedule):
        raise ValueError(f"guidance={guidance!r}: give a GuidanceSchedule "
                         "(vqgan_jax.samplers.guidance).")


def sample(params: Any, cond_tokens: jax.Array, rng: jax.Array, *, model: MaskGIT,
           num_steps: int = 8, top_k: int = 0, temperature: float | jax.Array = 1.0,
           choice_temperature: float | jax.Array = 4.5,
           guidance: GuidanceSchedule = GuidanceSchedule(),
           null_tokens: jax.Array | None = None, return_history: bool = False
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sample code grids by MaskGIT's iterative parallel decoding (Chang et al. 2022, sec. 3.2).

    Checks the arguments, then runs one jitted program (traceable: it may be called inside
    another jit).

    Args:
      params: the MaskGIT's parameters.
      cond_tokens: int32[B], any B >= 1: ``model.class_tokens(ids)``, or ``model.null_token``
        for an unconditional model.
      rng: a ``jax.random.key``; the same key (and batch size) gives the same codes. Step ``t``
        uses ``fold_in(rng, t)``.
      model: the :class:`MaskGIT` (static).
      num_steps: T, decoding steps, in ``[1, model.seq_len]`` (static). ``T = N`` fills one
        code a step.
      top_k: sample each code among its ``top_k`` most probable (0: all). Static.
      temperature: divides the (guided) logits before sampling; > 0. Traced.
      choice_temperature: the Gumbel noise on the confidences at step ``t`` is scaled by
        ``choice_temperature * (1 - (t + 1) / T)``; >= 0 (0: keep exactly the most probable
        sampled codes). Traced.
      guidance: the classifier-free guidance scale per step, at progress ``t / (T - 1)`` (0 for
        ``T = 1``). Used only with ``null_tokens``. A pytree: its ``scale`` is traced, its
        kind, power and interval compile once each.
      null_tokens: int32[B] of ``model.null_token`` (the unconditional half of the doubled
        batch) to enable guidance; None: no guidance (the model runs on B rows).
      return_history: also return the grid after every step (static).

    Returns:
      int32[B, N] codes in ``[0, model.vocab_size)``; with ``return_history`` also
      int32[T, B, N], the grid after each step with ``model.mask_token`` at positions still
      masked (``history[T - 1]`` is the returned codes).

    The confidence of a sampled code is its log-probability under the guided logits before
    temperature and top-k (as the reference scores ``softmax(logits)``); codes fixed at an
    earlier step rank above every new one and so are never masked again. Ties in confidence
    keep the later position (a stable sort, least confident first).

    Raises:
      ValueError: naming the argument for a bad ``cond_tokens``/``null_tokens`` shape,
        ``num_steps``, ``top_k``, ``temperature``, ``choice_temperature`` or ``guidance``.
    """
    _check(model, cond_tokens, num_steps, top_k, temperature, choice_temperature, guidance,
           null_tokens)
    return _sample(params, cond_tokens, rng, temperature, choice_temperature, guidance,
                   null_tokens, model=model, num_steps=num_steps, top_k=top_k,
                   return_history=return_history)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "top_k", "return_history"))
def _sample(params, cond_tokens, rng, temperature, choice_temperature, guidance, null_tokens, *,
            model: MaskGIT, num_steps: int, top_k: int, return_history: bool):
    n, b = model.seq_len, cond_tokens.shape[0]
    counts = jnp.array([masked_after_step(t, num_steps, n) for t in range(num_steps)],
                       jnp.int32)
    cond = cond_tokens.astype(jnp.int32)
    guided = null_tokens is not None
    if guided:
        cond = jnp.concatenate([cond, null_tokens.astype(jnp.int32)], axis=0)
    last = max(num_steps - 1, 1)

    def step(t, carry):
        codes, history = carry
        rows = jnp.concatenate([codes, codes], axis=0) if guided else codes
        logits = model.apply({"params": params}, rows, cond)  # (B or 2B, N, V)
        scale = guidance.scale_at(jnp.asarray(t, jnp.float32) / last) if guided else None
        logits = guide(logits, scale)  # (B, N, V)
        sample_rng, choice_rng = jax.random.split(jax.random.fold_in(rng, t))
        drawn = jax.random.categorical(sample_rng, filter_logits(logits, top_k, 1.0,
                                                                 temperature))
        masked = codes == model.mask_token
        drawn = jnp.where(masked, drawn.astype(jnp.int32), codes)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(log_probs, drawn[..., None], axis=-1)[..., 0]
        anneal = choice_temperature * (1.0 - (t + 1) / num_steps)
        confidence += anneal * jax.random.gumbel(choice_rng, confidence.shape)
        confidence = jnp.where(masked, confidence, jnp.inf)  # kept codes stay kept
        # Rank of each position by confidence, least confident first: re-mask the counts[t]
        # least confident (all among the newly drawn, since counts[t] < masked count).
        rank = jnp.argsort(jnp.argsort(confidence, axis=-1, stable=True), axis=-1)
        codes = jnp.where(rank < counts[t], model.mask_token, drawn)
        if return_history:
            history = history.at[t].set(codes)
        return codes, history

    codes = jnp.full((b, n), model.mask_token, jnp.int32)
    history = jnp.zeros((num_steps, b, n) if return_history else (0,), jnp.int32)
    codes, history = jax.lax.fori_loop(0, num_steps, step, (codes, history))
    return (codes, history) if return_history else codes


# ----------------------------------------------------------------------------- images

def draw_images(params: Any, frozen: dict[str, Any], sc: StepConfig, cond_tokens: jax.Array,
                rng: jax.Array, *, num_steps: int, top_k: int = 0,
                temperature: float | jax.Array = 1.0,
                choice_temperature: float | jax.Array = 4.5,
                guidance: GuidanceSchedule | None = None) -> jax.Array:
    """Sample code grids by :func:`sample` and decode them with the frozen tokenizer (traceable:
    the body that :func:`sample_images` and :class:`vqgan_jax.api.Generator` jit).

    Args:
      params: the MaskGIT's parameters; frozen: ``{"tokenizer": params}``
        (:func:`vqgan_jax.state.maskgit.load_for_sampling`); sc: its step config (static).
      cond_tokens: int32[B] class or null tokens (:func:`class_rows`).
      rng: a ``jax.random.key``.
      num_steps, top_k, temperature, choice_temperature: as :func:`sample`.
      guidance: classifier-free guidance (class models; the null rows are
        ``sc.model.null_token``); None: none (the model runs on B rows).

    Returns:
      float32[B, h * f, w * f, 3] in [-1, 1], ``(h, w) = sc.grid``.
    """
    b = cond_tokens.shape[0]
    null = None if guidance is None else jnp.full((b,), sc.model.null_token, jnp.int32)
    codes = sample(params, cond_tokens, rng, model=sc.model, num_steps=num_steps, top_k=top_k,
                   temperature=temperature, choice_temperature=choice_temperature,
                   guidance=GuidanceSchedule() if guidance is None else guidance,
                   null_tokens=null)  # (B, N)
    codes = codes.reshape(b, *sc.grid)
    x = sc.vq.apply({"params": frozen["tokenizer"]}, codes, method="decode_from_indices")
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def check_sampling_args(sc: StepConfig, height: int, width: int, guidance_scale: float,
                        guidance_schedule: str = "constant", guidance_power: float = 1.0,
                        guidance_interval: tuple[float, float] = (0.0, 1.0),
                        num_steps: int | None = None, top_k: int = 0,
                        temperature: float = 1.0, choice_temperature: float = 4.5) -> None:
    """Raise before any compile for a grid, guidance or setting a MaskGIT cannot sample (the
    counterpart of :func:`vqgan_jax.samplers.autoregressive.check_sampling_args`).

    Args:
      height, width: the code grid asked for.
      guidance_scale, guidance_schedule, guidance_power, guidance_interval: the
        :class:`GuidanceSchedule` fields.
      num_steps: T in ``[1, h * w]`` (None: not checked); top_k >= 0; temperature > 0;
        choice_temperature >= 0.

    Raises:
      ValueError: naming the argument: a grid other than the training grid ``sc.grid``
        (MaskGIT's learned positions cover that grid only; there is no sliding window), guidance
        (scale != 1) on an unconditional model, an invalid guidance schedule, or a setting
        outside its range.
    """
    GuidanceSchedule(guidance_schedule, guidance_scale, guidance_power, guidance_interval)
    gh, gw = sc.grid
    if (height, width) != (gh, gw):
        raise ValueError(f"height x width = {height}x{width} codes: MaskGIT samples its training "
                         f"grid only ({gh}x{gw} codes; its learned positions cover that grid); "
                         "leave height and width out.")
    if guidance_scale != 1.0 and sc.num_classes == 0:
        raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model "
                         "(trained with config.class_drop_prob > 0); leave it at 1.0.")
    if num_steps is not None and not (isinstance(num_steps, (int, np.integer))
                                      and 1 <= num_steps <= gh * gw):
        raise ValueError(f"num_steps={num_steps!r}: give an int in [1, {gh * gw}] (the grid's "
                         "codes; each step fills at least one; MaskGIT uses 8 to 12).")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 keeps every code).")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0.")
    if not choice_temperature >= 0:
        raise ValueError(f"choice_temperature={choice_temperature!r} must be >= 0 (0 keeps the "
                         "most probable codes; MaskGIT uses 4.5).")


_draw_images = jax.jit(draw_images, static_argnames=("sc", "num_steps", "top_k"))


def sample_images(params: Any, frozen: dict[str, Any], sc: StepConfig, cond_tokens: jax.Array,
                  rng: jax.Array, *, height: int | None = None, width: int | None = None,
                  num_steps: int = 8, top_k: int = 0, temperature: float = 1.0,
                  choice_temperature: float = 4.5, guidance_scale: float = 1.0,
                  guidance_schedule: str = "constant", guidance_power: float = 1.0,
                  guidance_interval: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Sample code grids by MaskGIT's iterative decoding and decode them with the frozen
    tokenizer (one jitted program per setting; see :func:`draw_images`).

    Args:
      params, frozen, sc: as :func:`vqgan_jax.state.maskgit.load_for_sampling` returns.
      cond_tokens: int32[B] (:func:`class_rows`).
      rng: a ``jax.random.key``; the same key and batch gives the same images.
      height, width: the code grid; only the training grid (the default) is accepted.
      num_steps, top_k, temperature, choice_temperature: as :func:`sample`.
      guidance_scale: classifier-free guidance (class models); 1 disables it under every
        schedule (the model then runs on B rows, not 2B).
      guidance_schedule, guidance_power, guidance_interval: the scale's schedule over the
        steps (:class:`GuidanceSchedule`).

    Returns:
      float32[B, h * f, w * f, 3] in [-1, 1].

    Raises:
      ValueError: as :func:`check_sampling_args`.
    """
    height, width = height or sc.grid[0], width or sc.grid[1]
    check_sampling_args(sc, height, width, guidance_scale, guidance_schedule, guidance_power,
                        guidance_interval, num_steps, top_k, temperature, choice_temperature)
    guidance = None if guidance_scale == 1.0 else GuidanceSchedule(
        guidance_schedule, float(guidance_scale), float(guidance_power),
        tuple(float(v) for v in guidance_interval))
    return np.asarray(_draw_images(
        params, frozen, sc, jnp.asarray(cond_tokens, jnp.int32), rng, num_steps=int(num_steps),
        top_k=int(top_k), temperature=jnp.float32(temperature),
        choice_temperature=jnp.float32(choice_temperature), guidance=guidance))


def class_rows(model: MaskGIT, class_ids: list[int], num: int) -> jax.Array:
    """The tokens for ``num`` samples of each class in ``class_ids``, class by class
    (``model.class_tokens``); an unconditional model (``num_classes = 0``): ``num`` null tokens.

    Returns:
      int32[len(class_ids) * num] (unconditional: int32[num]).

    Raises:
      ValueError: as :func:`vqgan_jax.samplers.autoregressive.check_class_ids`.
    """
    kind = "class" if model.num_classes else "unconditional"
    check_class_ids(kind, model.num_classes, list(class_ids))
    if kind == "unconditional":
        return jnp.full((num,), model.null_token, jnp.int32)
    return model.class_tokens(jnp.repeat(jnp.asarray(class_ids, jnp.int32), num))
