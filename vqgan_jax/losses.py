"""Pure loss functions of VQGAN training (Esser et al. 2021, eq. 5-7; taming-transformers).

All take and return jax arrays, compute in float32 and are jittable; none holds state.
The perceptual term is `vqgan_jax.models.lpips.lpips_fn`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
ArrayTree = Any  # an array or a pytree of arrays


def l1_loss(x: Array, x_hat: Array) -> Array:
    """Mean absolute error, the reconstruction term of taming's VQLPIPSWithDiscriminator.

    Args:
      x, x_hat: float[...] of the same shape (images: [B, H, W, 3] in [-1, 1]).

    Returns:
      float32[] scalar, mean over all elements.
    """
    return jnp.mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """Hinge discriminator loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))).

    Args:
      logits_real: float[...] discriminator logits on real images (e.g. [B, h, w, 1]).
      logits_fake: float[...] logits on reconstructions; shapes may differ from logits_real.

    Returns:
      float32[] scalar >= 0.
    """
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """Non-saturating GAN discriminator loss (Goodfellow et al. 2014), as taming writes it.

    0.5 * (mean(softplus(-real)) + mean(softplus(fake))), i.e. the mean binary cross-entropy
    with real = 1 and fake = 0.

    Args:
      logits_real, logits_fake: float[...] discriminator logits.

    Returns:
      float32[] scalar >= 0.
    """
    loss_real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
    loss_fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
    return 0.5 * (loss_real + loss_fake)


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def d_loss(kind: str, logits_real: Array, logits_fake: Array) -> Array:
    """Discriminator loss selected by name (`config.loss.disc_loss`).

    Args:
      kind: "hinge" or "vanilla".
      logits_real, logits_fake: float[...] discriminator logits.

    Returns:
      float32[] scalar.

    Raises:
      ValueError: unknown kind.
    """
    if kind not in _D_LOSSES:
        raise ValueError(f"config.loss.disc_loss must be one of {sorted(_D_LOSSES)}, got {kind!r}.")
    return _D_LOSSES[kind](logits_real, logits_fake)


def generator_adv_loss(logits_fake: Array) -> Array:
    """Generator adversarial loss -mean(logits_fake) (taming uses it for hinge and vanilla).

    Args:
      logits_fake: float[...] discriminator logits on reconstructions.

    Returns:
      float32[] scalar (unbounded).
    """
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adopt_weight(weight: float | Array, step: int | Array, threshold: int | Array) -> Array:
    """`weight` from `step >= threshold` on, else 0 (taming's disc_start switch); jittable.

    Args:
      weight: float scalar (e.g. disc_factor).
      step: int scalar, the global step (may be traced).
      threshold: int scalar, the first step with a nonzero weight (disc_start).

    Returns:
      float32[] scalar.
    """
    return jnp.where(step >= threshold, jnp.asarray(weight, jnp.float32), 0.0)


def adaptive_weight(
    nll_grad: ArrayTree,
    g_grad: ArrayTree,
    disc_weight: float | Array,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> Array:
    """Adaptive GAN weight lambda (Esser et al. 2021, eq. 7), with no gradient through it.

    lambda = clip(||grad nll|| / (||grad g|| + eps), 0, max_weight) * disc_weight, both
    gradients taken w.r.t. the decoder's last layer; norms are Frobenius (L2 over all
    elements, and over all leaves for a pytree), in float32.

    Args:
      nll_grad: gradient of the reconstruction (+ perceptual) loss; an array or pytree.
      g_grad: gradient of `generator_adv_loss`, same structure as nll_grad.
      disc_weight: float scalar multiplier (config disc_weight).
      eps: added to ||g_grad|| against division by zero.
      max_weight: upper clip of the ratio.

    Returns:
      float32[] scalar in [0, max_weight * disc_weight].
    """
    norm = lambda tree: optax.tree.norm(jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), tree))
    ratio = norm(nll_grad) / (norm(g_grad) + eps)
    weight = jnp.clip(ratio, 0.0, max_weight) * jnp.asarray(disc_weight, jnp.float32)
    return jax.lax.stop_gradient(weight)
