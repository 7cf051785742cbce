"""VQGAN and ViT-VQGAN loss functions and GAN regularizers against direct float64 numpy
computations (R1 also against finite differences)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import losses


def _logits(seed, shape=(3, 6, 6, 1)):
    return np.random.default_rng(seed).normal(scale=2.0, size=shape).astype(np.float32)


def _softplus(x):
    return np.logaddexp(0.0, x)


def test_l1_loss():
    x, x_hat = _logits(0), _logits(1)
    x_hat = jnp.asarray(x_hat, jnp.bfloat16)
    out = losses.l1_loss(jnp.asarray(x), x_hat)
    expected = np.mean(np.abs(x.astype(np.float64) - np.asarray(x_hat, np.float64)))
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_d_losses_and_generator_loss():
    real, fake = _logits(2), _logits(3, (3, 5, 5, 1))
    r, f = real.astype(np.float64), fake.astype(np.float64)
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)))
    vanilla = 0.5 * (np.mean(_softplus(-r)) + np.mean(_softplus(f)))
    np.testing.assert_allclose(losses.hinge_d_loss(real, fake), hinge, rtol=1e-6)
    np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
    np.testing.assert_allclose(losses.d_loss("hinge", real, fake), hinge, rtol=1e-6)
    jitted = jax.jit(losses.d_loss, static_argnums=0)
    np.testing.assert_allclose(jitted("vanilla", real, fake), vanilla, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_adv_loss(fake), -np.mean(f), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="config.loss.disc_loss"):
        losses.d_loss("wgan", real, fake)


def test_adopt_weight():
    assert float(losses.adopt_weight(0.8, 9, 10)) == 0.0
    assert float(losses.adopt_weight(0.8, 10, 10)) == pytest.approx(0.8)
    assert float(losses.adopt_weight(0.8, 11, 10)) == pytest.approx(0.8)
    jitted = jax.jit(losses.adopt_weight)
    assert [float(jitted(1.0, jnp.int32(s), 5)) for s in (0, 4, 5, 6)] == [0.0, 0.0, 1.0, 1.0]


def _np_adaptive(nll, g, disc_weight, eps=1e-4, max_weight=1e4):
    ratio = np.linalg.norm(nll.astype(np.float64)) / (np.linalg.norm(g.astype(np.float64)) + eps)
    return np.clip(ratio, 0, max_weight) * disc_weight


def test_adaptive_weight():
    rng = np.random.default_rng(4)
    nll = rng.normal(size=(3, 3, 16, 3)).astype(np.float32)
    g = (0.1 * rng.normal(size=(3, 3, 16, 3))).astype(np.float32)
    fn = jax.jit(losses.adaptive_weight)
    out = fn(nll, g, 0.8)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, _np_adaptive(nll, g, 0.8), rtol=1e-5)
    # tiny g_grad: the ratio clips at max_weight
    clipped = fn(nll, np.full_like(g, 1e-12), 0.5)
    assert np.linalg.norm(nll) / 1e-4 > 1e4  # unclipped ratio
    np.testing.assert_allclose(clipped, 0.5 * 1e4, rtol=1e-6)
    # no gradient flows through the weight
    grad = jax.grad(lambda a: losses.adaptive_weight(a, g, 1.0))(jnp.asarray(nll))
    np.testing.assert_array_equal(grad, 0.0)


def test_l2_and_logit_laplace_against_float64():
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    x_hat = rng.uniform(-1.3, 1.3, (2, 4, 4, 3)).astype(np.float32)  # some outside [-1, 1]
    x64, xh64 = x.astype(np.float64), np.clip(x_hat.astype(np.float64), -1, 1)
    np.testing.assert_allclose(losses.l2_loss(x, x_hat),
                               np.mean((x64 - x_hat.astype(np.float64)) ** 2), rtol=1e-6)
    eps = 0.1
    y, y_hat = (eps + (1 - 2 * eps) * (a + 1) / 2 for a in (x64, xh64))
    logit = lambda a: np.log(a / (1 - a))
    # -log p(y) with p(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)), mu = logit(y_hat), b = 1
    nll = np.log(2.0) + np.log(y * (1 - y)) + np.abs(logit(y) - logit(y_hat))
    out = jax.jit(losses.logit_laplace_loss)(x, x_hat)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, np.mean(nll), rtol=1e-5)
    # minimised at x_hat = x; the model-dependent part is then 0
    at_x = losses.logit_laplace_loss(x, x)
    np.testing.assert_allclose(at_x, np.mean(np.log(2.0) + np.log(y * (1 - y))), rtol=1e-5)
    assert float(at_x) < float(out)


def test_gan_loss_kinds_against_formulas():
    real, fake = _logits(6), _logits(7, (3, 5, 5, 1))
    r, f = real.astype(np.float64), fake.astype(np.float64)
    ns_d = np.mean(_softplus(-r)) + np.mean(_softplus(f))   # -log s(D(x)) - log(1 - s(D(G)))
    np.testing.assert_allclose(losses.d_loss("non_saturating", real, fake), ns_d, rtol=1e-6)
    sigmoid = 1 / (1 + np.exp(-f))
    np.testing.assert_allclose(losses.g_loss("non_saturating", fake), -np.mean(np.log(sigmoid)),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.g_loss("vanilla", fake), np.mean(np.log(1 - sigmoid)),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.g_loss("hinge", fake), -np.mean(f), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="config.loss.gen_loss"):
        losses.g_loss("wgan", fake)


def test_r1_penalty_against_direct_per_image_gradients():
    # A linear D(x) = sum(w * x): grad_x D = w for every image, R1 = ||w||^2.
    w = np.random.default_rng(8).normal(size=(4, 4, 3)).astype(np.float32)
    x = np.random.default_rng(9).normal(size=(3, 4, 4, 3)).astype(np.float32)
    linear = lambda w: (lambda x: jnp.sum(x * w, axis=(1, 2, 3)))
    np.testing.assert_allclose(losses.r1_penalty(linear(w), x), np.sum(w.astype(np.float64) ** 2),
                               rtol=1e-5)
    # A tiny nonlinear D with a per-image logit map: mean_i ||grad_{x_i} sum D(x_i)||^2 from
    # per-image autodiff, and its gradient w.r.t. the parameters (double backprop) against
    # central finite differences.
    k = np.random.default_rng(10).normal(size=(3, 2)).astype(np.float32)

    def disc(k):
        return lambda x: jnp.tanh(x @ k) ** 2          # (B, 4, 4, 2) logits

    per_image = [np.sum(np.asarray(jax.grad(lambda xi: jnp.sum(disc(k)(xi[None])))(x[i]),
                                   np.float64) ** 2) for i in range(3)]
    np.testing.assert_allclose(losses.r1_penalty(disc(k), x), np.mean(per_image), rtol=1e-5)
    grad = jax.grad(lambda k: losses.r1_penalty(disc(k), x))(k)
    k64 = k.astype(np.float64)
    with jax.enable_x64(True):  # the penalty written out again, in float64
        def f(kk):
            gx = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ kk) ** 2))(jnp.asarray(x, jnp.float64))
            return float(jnp.mean(jnp.sum(gx ** 2, axis=(1, 2, 3))))
        h = 1e-6
        fd = np.zeros_like(k64)
        for idx in np.ndindex(k.shape):
            e = np.zeros_like(k64)
            e[idx] = h
            fd[idx] = (f(jnp.asarray(k64 + e)) - f(jnp.asarray(k64 - e))) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)


def test_lecam_reg_and_anchor_update():
    real, fake = _logits(11), _logits(12, (3, 5, 5, 1))
    a_r, a_f = 0.4, -0.3
    r, f = real.astype(np.float64), fake.astype(np.float64)
    expected = (np.mean(np.maximum(r - a_f, 0) ** 2) + np.mean(np.maximum(a_r - f, 0) ** 2))
    np.testing.assert_allclose(jax.jit(losses.lecam_reg)(real, fake, a_r, a_f), expected,
                               rtol=1e-5)
    # anchors take no gradient
    g = jax.grad(lambda a: losses.lecam_reg(real, fake, a, a_f))(jnp.float32(a_r))
    assert float(g) == 0.0
    anchors = losses.lecam_update(jnp.array([a_r, a_f]), real, fake, 0.9)
    np.testing.assert_allclose(anchors, [0.9 * a_r + 0.1 * r.mean(), 0.9 * a_f + 0.1 * f.mean()],
                               rtol=1e-5)
