"""Pure loss functions of VQGAN training (Esser et al. 2021, eq. 5-7; taming-transformers) and
of ViT-VQGAN (Yu et al. 2021): reconstruction terms, GAN losses and discriminator regularizers.

All take and return jax arrays, compute in float32 and are jittable; none holds state (the
LeCAM anchors are passed in and their update returned, the trainer keeps them).
The perceptual term is `vqgan_jax.models.lpips.lpips_fn`.
"""

from typing import Any, Callable

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


def l2_loss(x: Array, x_hat: Array) -> Array:
    """Mean squared error (the L2 term of Yu et al. 2021, sec. 3.3).

    Args:
      x, x_hat: float[...] of the same shape.

    Returns:
      float32[] scalar, mean over all elements.
    """
    return jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


LOGIT_LAPLACE_EPS = 0.1  # Ramesh et al. 2021, sec. A.3: pixels squeezed into [eps, 1 - eps]


def logit_laplace_loss(x: Array, x_hat: Array, eps: float = LOGIT_LAPLACE_EPS) -> Array:
    """Negative log-likelihood of ``x`` under a logit-Laplace distribution located at ``x_hat``.

    The logit-Laplace distribution (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation",
    sec. A.3) on y in (0, 1) with location mu and scale b has density
    ``p(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y))``. As there, pixels are squeezed
    away from 0 and 1: ``y = eps + (1 - 2 eps) * (x + 1) / 2`` (x in [-1, 1]). Yu et al. 2021
    add this term on the reconstruction with weight 0.1 but do not give its parameterisation;
    we keep a 3-channel decoder (the same for both tokenizers) and take

        mu = logit(eps + (1 - 2 eps) * (clip(x_hat, -1, 1) + 1) / 2),     b = 1,

        loss = mean over elements of [ log 2 + log y + log(1 - y) + |logit(y) - mu| ]

    i.e. the exact NLL in nats per sub-pixel (the first three terms do not depend on the model
    and make it a proper likelihood; it can be negative). Its minimum is at x_hat = x. Where
    x_hat leaves [-1, 1] the clip passes no gradient (the L2 term pulls it back). Ramesh et al.
    also predict ln b with 3 more output channels; we do not.

    Args:
      x: float[...] target in [-1, 1].
      x_hat: float[...] reconstruction, same shape.
      eps: the squeeze margin (0.1).

    Returns:
      float32[] scalar.
    """
    squeeze = lambda a: eps + (1.0 - 2.0 * eps) * (a + 1.0) / 2.0
    y = squeeze(jnp.clip(x.astype(jnp.float32), -1.0, 1.0))
    y_hat = squeeze(jnp.clip(x_hat.astype(jnp.float32), -1.0, 1.0))
    logit = lambda a: jnp.log(a) - jnp.log1p(-a)
    nll = jnp.log(2.0) + jnp.log(y) + jnp.log1p(-y) + jnp.abs(logit(y) - logit(y_hat))
    return jnp.mean(nll)


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


def non_saturating_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """The logistic discriminator loss of StyleGAN2 (Karras et al. 2020): the binary
    cross-entropy mean(softplus(-real)) + mean(softplus(fake)), without taming's 0.5.

    Args:
      logits_real, logits_fake: float[...] discriminator logits.

    Returns:
      float32[] scalar >= 0.
    """
    return 2.0 * vanilla_d_loss(logits_real, logits_fake)


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss,
             "non_saturating": non_saturating_d_loss}
D_LOSSES = tuple(_D_LOSSES)


def d_loss(kind: str, logits_real: Array, logits_fake: Array) -> Array:
    """Discriminator loss selected by name (`config.loss.disc_loss`).

    Args:
      kind: "hinge", "vanilla" or "non_saturating".
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


def vanilla_g_loss(logits_fake: Array) -> Array:
    """Minimax generator loss (Goodfellow et al. 2014, eq. 1): mean(log(1 - sigmoid(fake)))
    = -mean(softplus(fake)); its gradient vanishes where D rejects the fakes confidently.

    Args:
      logits_fake: float[...] discriminator logits on reconstructions.

    Returns:
      float32[] scalar <= 0.
    """
    return -jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))


def non_saturating_g_loss(logits_fake: Array) -> Array:
    """Non-saturating generator loss (Goodfellow et al. 2014, sec. 3; StyleGAN2):
    -mean(log sigmoid(fake)) = mean(softplus(-fake)).

    Args:
      logits_fake: float[...] discriminator logits on reconstructions.

    Returns:
      float32[] scalar >= 0.
    """
    return jnp.mean(jax.nn.softplus(-logits_fake.astype(jnp.float32)))


_G_LOSSES = {"hinge": generator_adv_loss, "vanilla": vanilla_g_loss,
             "non_saturating": non_saturating_g_loss}
G_LOSSES = tuple(_G_LOSSES)


def g_loss(kind: str, logits_fake: Array) -> Array:
    """Generator adversarial loss selected by name (`config.loss.gen_loss`).

    Args:
      kind: "hinge" (-mean(fake), taming's choice with either discriminator loss), "vanilla"
        (minimax, :func:`vanilla_g_loss`) or "non_saturating" (:func:`non_saturating_g_loss`).
      logits_fake: float[...] discriminator logits on reconstructions.

    Returns:
      float32[] scalar.

    Raises:
      ValueError: unknown kind.
    """
    if kind not in _G_LOSSES:
        raise ValueError(f"config.loss.gen_loss must be one of {sorted(_G_LOSSES)}, got {kind!r}.")
    return _G_LOSSES[kind](logits_fake)


def r1_penalty(disc_fn: Callable[[Array], Array], x: Array) -> Array:
    """R1 gradient penalty (Mescheder et al. 2018, eq. 9) without its gamma / 2 factor.

    ``mean over the batch of ||d sum(D(x_i)) / d x_i||^2``: the gradient of the sum of all
    logits (a PatchGAN's too) w.r.t. the real images, squared and summed over each image's
    pixels and channels. Differentiable w.r.t. whatever ``disc_fn`` closes over (double
    backprop); the trainer applies ``r1_weight / 2 * r1_every`` times it every ``r1_every``
    steps (lazy regularization, Karras et al. 2020, sec. 3.1).

    Args:
      disc_fn: images float[B, H, W, C] -> logits float[B, ...].
      x: float[B, H, W, C] real images.

    Returns:
      float32[] scalar >= 0.
    """
    grad = jax.grad(lambda x: jnp.sum(disc_fn(x).astype(jnp.float32)))(x.astype(jnp.float32))
    return jnp.mean(jnp.sum(jnp.square(grad).reshape(grad.shape[0], -1), axis=-1))


def lecam_reg(logits_real: Array, logits_fake: Array, anchor_real: Array,
              anchor_fake: Array) -> Array:
    """LeCAM regularizer (Tseng et al. 2021, "Regularizing Generative Adversarial Networks
    under Limited Data"), in the one-sided form of the authors' code (and MAGVIT's)::

        R_LC = mean(relu(D(x) - alpha_F)^2) + mean(relu(alpha_R - D(G(z)))^2)

    with alpha_R, alpha_F the EMAs of D's mean output on real and fake images (paper eq. 3
    has no relu). Anchors get no gradient.

    Args:
      logits_real, logits_fake: float[...] discriminator logits.
      anchor_real, anchor_fake: float32[] scalars alpha_R, alpha_F.

    Returns:
      float32[] scalar >= 0.
    """
    a_r, a_f = (jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))
                for a in (anchor_real, anchor_fake))
    real = logits_real.astype(jnp.float32)
    fake = logits_fake.astype(jnp.float32)
    return jnp.mean(jnp.square(jax.nn.relu(real - a_f))) + jnp.mean(
        jnp.square(jax.nn.relu(a_r - fake)))


def lecam_update(anchors: Array, logits_real: Array, logits_fake: Array, decay: float) -> Array:
    """EMA step of the LeCAM anchors: ``float32[2]`` (alpha_R, alpha_F) ->
    ``decay * anchors + (1 - decay) * (mean D(x), mean D(G(z)))``, no gradient."""
    means = jnp.stack([jnp.mean(logits_real.astype(jnp.float32)),
                       jnp.mean(logits_fake.astype(jnp.float32))])
    return jax.lax.stop_gradient(decay * anchors + (1.0 - decay) * means)


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
