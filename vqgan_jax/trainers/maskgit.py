"""Stage 2 by masked-token generation: train a bidirectional transformer to predict masked codes
of a frozen tokenizer (Chang et al. 2022, "MaskGIT", sec. 3.2 "Masked Visual Token Modeling").

Each step: the batch of augmented crops is encoded to codes by the frozen tokenizer inside the
jitted step (as the GPT trainer does, :func:`vqgan_jax.trainers.transformer.encode_codes`);
each example draws a mask ratio from the cosine schedule (:func:`mask_ratio`, MaskGIT eq. 2
with ``gamma(r) = cos(pi r / 2)``), that many of its codes become ``[MASK]``, and the loss is the
cross-entropy of the true codes at the masked positions only (MaskGIT eq. 1). Class labels are
replaced by the null class with ``class_drop_prob`` (classifier-free guidance, Ho & Salimans
2021). Sampling a trained workdir is :mod:`vqgan_jax.samplers.maskgit`'s.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqgan_jax import metrics as metrics_lib
from vqgan_jax.samplers import maskgit as maskgit_sampler
from vqgan_jax.samplers.autoregressive import image_grid
from vqgan_jax.state import maskgit as stage_state
from vqgan_jax.state.maskgit import StepConfig, TrainState
from vqgan_jax.trainers import loop
from vqgan_jax.trainers.transformer import encode_codes, run_stage2


# ----------------------------------------------------------------------------- masking

def mask_ratio(u: jax.Array) -> jax.Array:
    """The cosine mask schedule ``gamma(u) = cos(pi/2 * u)`` (MaskGIT eq. 2, sec. 3.2 and 4.3):
    float[...] ``u`` in ``[0, 1]`` -> the fraction of codes to mask, in ``[0, 1]`` (clipped:
    float32 ``cos(pi/2)`` is -4.4e-8). ``u -> 0`` masks everything, ``u = 1`` almost nothing."""
    return jnp.clip(jnp.cos(0.5 * jnp.pi * jnp.asarray(u, jnp.float32)), 0.0, 1.0)


def num_masked(u: jax.Array, seq_len: int) -> jax.Array:
    """int32[B]: codes to mask per example, ``n = max(1, ceil(mask_ratio(u) * N))``, N =
    ``seq_len`` (at least one, so every example has a target; computed in float32)."""
    return jnp.maximum(1, jnp.ceil(mask_ratio(u) * seq_len)).astype(jnp.int32)


def mask_from_noise(u: jax.Array, noise: jax.Array) -> jax.Array:
    """bool[B, N]: True at the ``num_masked(u, N)`` positions of each row with the smallest
    ``noise`` (float32[B, N]): exactly that many per row, whatever ties the noise has (ranks
    by a stable sort).

    Args:
      u: float32[B] schedule positions in ``[0, 1]``.
      noise: float32[B, N], e.g. uniform; a random ranking of the positions.
    """
    n = num_masked(u, noise.shape[1])
    ranks = jnp.argsort(jnp.argsort(noise, axis=1, stable=True), axis=1, stable=True)
    return ranks < n[:, None]


def random_mask(rng: jax.Array, batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """MaskGIT's training mask: ``u ~ U(0, 1]`` per example, ``n = max(1, ceil(cos(pi/2 u) N))``
    positions chosen uniformly without replacement.

    Returns:
      ``(mask: bool[B, N], u: float32[B])``.
    """
    u_rng, noise_rng = jax.random.split(rng)
    u = 1.0 - jax.random.uniform(u_rng, (batch_size,))  # U[0, 1) -> U(0, 1]
    return mask_from_noise(u, jax.random.uniform(noise_rng, (batch_size, seq_len))), u


def cond_tokens(labels: jax.Array | None, batch_size: int, sc: StepConfig,
                rng: jax.Array | None) -> jax.Array:
    """int32[B]: the class tokens of ``labels`` (int[B] in ``[0, num_classes)``), each replaced
    by the null token with ``sc.class_drop_prob`` when ``rng`` is given (training); the null
    token everywhere for an unconditional model (``sc.num_classes == 0``)."""
    null = jnp.full((batch_size,), sc.model.null_token, jnp.int32)
    if sc.num_classes == 0:
        return null
    tokens = sc.model.class_tokens(labels)
    if rng is not None and sc.class_drop_prob > 0:
        tokens = jnp.where(jax.random.bernoulli(rng, sc.class_drop_prob, (batch_size,)), null,
                           tokens)
    return tokens


# ----------------------------------------------------------------------------- the step

def loss_fn(params: Any, codes: jax.Array, cond: jax.Array, mask: jax.Array, sc: StepConfig,
            rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of the true codes at the masked positions (MaskGIT eq. 1), in nats.

    Args:
      params: MaskGIT parameters.
      codes: int32[B, N] true codes in ``[0, V)``.
      cond: int32[B] class or null tokens (:func:`cond_tokens`).
      mask: bool[B, N], True where the input is ``[MASK]`` (at least one per batch).
      rng: dropout RNG (training), or None (no dropout).

    Returns:
      ``(loss, {"masked_accuracy": ...})``: float32 scalars; ``loss`` is the sum over the
      batch's masked positions of ``-sum_v q(v) log p(v)`` divided by their number, with
      ``q`` the one-hot code smoothed as ``(1 - a) onehot + a / V`` for ``a =
      sc.label_smoothing`` (``optax.smooth_labels``); ``masked_accuracy`` the fraction of
      masked positions whose argmax is the true code.
    """
    inputs = jnp.where(mask, sc.model.mask_token, codes)
    logits = sc.model.apply({"params": params}, inputs, cond, train=rng is not None,
                            rngs=None if rng is None else {"dropout": rng})  # (B, N, V)
    if sc.label_smoothing > 0:
        targets = optax.smooth_labels(jax.nn.one_hot(codes, logits.shape[-1]), sc.label_smoothing)
        ce = optax.softmax_cross_entropy(logits, targets)
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(ce * weights) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == codes) * weights) / count
    return loss, dict(masked_accuracy=accuracy)


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any],
               sc: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the masked-code cross-entropy (MaskGIT sec. 3.2).

    Args:
      state: the TrainState (donated).
      batch: ``image``: float32[B, H, W, 3] in [-1, 1]; ``label``: int32[B] (read in class
        mode).
      frozen: ``{"tokenizer": params}``, never updated.
      sc: static step configuration.

    The RNG is ``fold_in(key(sc.seed), step)``, split into the class drop, the mask
    (:func:`random_mask`) and dropout.

    Returns:
      ``(new_state, metrics)``: float32 scalars ``loss`` (nats per masked code, with label
      smoothing when on), ``masked_accuracy``, ``mask_ratio`` (masked / all codes),
      ``grad_norm`` and ``nonfinite`` (1 when the loss or gradient was NaN/Inf and the update
      was skipped).
    """
    rng = jax.random.fold_in(jax.random.key(sc.seed), state.step)
    drop_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
    codes = encode_codes(sc.vq, frozen["tokenizer"], batch["image"])  # (B, N)
    b, n = codes.shape
    cond = cond_tokens(batch.get("label"), b, sc, drop_rng)
    mask, _ = random_mask(mask_rng, b, n)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, codes, cond, mask, sc, dropout_rng)
    # A NaN/Inf loss or gradient leaves the parameters and optimizer state as they were.
    new_state, grad_norm, finite = loop.update_if_finite(state, grads, loss, sc.tx)
    metrics = dict(loss=loss, masked_accuracy=aux["masked_accuracy"],
                   mask_ratio=jnp.mean(mask.astype(jnp.float32)), grad_norm=grad_norm,
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return (new_state.replace(step=state.step + 1),
            jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics))


def jit_train_step(sc: StepConfig, mesh, state_shardings, frozen_shardings):
    """``train_step`` jitted once with shardings over ``mesh`` (:func:`loop.jit_step`: the
    state is donated on accelerators)."""
    return loop.jit_step(functools.partial(train_step, sc=sc), mesh, state_shardings,
                         frozen_shardings)


# ----------------------------------------------------------------------------- sampling

def _sample_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.sample``'s sampler settings (:func:`samplers.maskgit.sample_images` keywords)."""
    s = config.sample
    return dict(num_steps=s.num_steps, top_k=s.top_k, temperature=s.temperature,
                choice_temperature=s.choice_temperature, guidance_scale=s.guidance_scale,
                guidance_schedule=s.get("guidance_schedule", "constant"),
                guidance_power=s.get("guidance_power", 1.0),
                guidance_interval=tuple(s.get("guidance_interval", (0.0, 1.0))))


def check_sample_config(config: ml_collections.ConfigDict, sc: StepConfig) -> None:
    """Refuse, before training, a ``config.sample`` the end-of-training samples could not use.

    Raises:
      ValueError: as :func:`vqgan_jax.samplers.maskgit.check_sampling_args`, prefixed by
        ``config.sample:`` (e.g. guidance_scale != 1 on an unconditional model).
    """
    if config.sample.num_per_row == 0:
        return
    try:
        maskgit_sampler.check_sampling_args(sc, *sc.grid, **_sample_settings(config))
    except ValueError as e:
        raise ValueError(f"config.sample: {e}") from None


def _sample_grid(params, frozen, sc: StepConfig, config: ml_collections.ConfigDict,
                 rng: jax.Array) -> np.ndarray | None:
    """The end-of-training picture for ``samples.png``: uint8[H, W, 3] of
    ``config.sample.num_per_row`` images per row, a row per class (up to
    ``config.sample.max_rows``; one null-class row when unconditional), drawn by MaskGIT's
    iterative decoding with ``config.sample``'s settings (:func:`_sample_settings`) and decoded
    by the frozen tokenizer; None with ``num_per_row=0``."""
    s = config.sample
    if s.num_per_row == 0:
        return None
    rows = min(s.max_rows, sc.num_classes) if sc.num_classes else 1
    cond = maskgit_sampler.class_rows(sc.model, list(range(rows)) if sc.num_classes else [],
                                      s.num_per_row)
    images = maskgit_sampler.sample_images(params, frozen, sc, cond, rng,
                                           **_sample_settings(config))
    return image_grid(np.asarray(metrics_lib.to_uint8(images)), rows)


# ----------------------------------------------------------------------------- the job

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train a MaskGIT per ``config`` in ``workdir`` through :func:`loop.run_job` (resume,
    preemption, non-finite steps, checkpoints, TensorBoard and ``scalars.jsonl`` as described
    there). At the end it writes ``metrics.json`` (the last logged train metrics and ``step``)
    and ``samples.png`` (:func:`_sample_grid`: a row per class, MaskGIT's iterative decoding).

    Returns:
      The last logged train metrics: ``loss`` (nats per masked code), ``masked_accuracy``,
      ``mask_ratio``, ``grad_norm``, ``codes_per_s``, ``img_per_s``, ``nonfinite_steps``,
      ``step``; or ``{"preempted_at_step": step}``.

    Raises:
      ValueError: for a config field (``config.sample`` included) or dataset that cannot work,
        before anything compiles.
      FloatingPointError: after ``config.max_consecutive_nonfinite`` non-finite steps in a row.
    """
    return run_stage2(
        config, workdir, stage_state, jit_train_step, _sample_grid, check=check_sample_config,
        describe=lambda sc, config: f"MaskGIT; {config.conditioning} conditioning, "
        f"{sc.grid[0]}x{sc.grid[1]} codes of {sc.model.vocab_size}")
