"""VQGAN loss functions against direct float64 numpy computations."""

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
