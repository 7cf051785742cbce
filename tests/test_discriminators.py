"""taming's NLayerDiscriminator (PatchGAN): layout, parameter count, init and BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vqgan_jax.models.discriminators import NLayerDiscriminator


def _train_apply(model):
    return lambda variables, x: model.apply(variables, x, train=True, mutable=["batch_stats"])


def _abstract_vars(model, size):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_taming_param_count_and_names():
    variables = _abstract_vars(NLayerDiscriminator(ndf=64, n_layers=3), 256)
    params = nn.unbox(variables["params"])
    assert sum(np.prod(a.shape) for a in jax.tree.leaves(params)) == 2_765_633
    assert set(params) == {f"main_{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    assert set(variables["batch_stats"]) == {"main_3", "main_6", "main_9"}
    assert params["main_2"]["kernel"].shape == (4, 4, 64, 128) and "bias" not in params["main_2"]
    assert params["main_11"]["kernel"].shape == (4, 4, 512, 1)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def test_output_shape_logical_axes_and_init():
    model = NLayerDiscriminator(ndf=16, n_layers=3)
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params = variables["params"]
    assert isinstance(params["main_0"]["kernel"], nn.LogicallyPartitioned)
    specs = nn.get_partition_spec(params)
    assert specs["main_0"]["kernel"] == P("conv_h", "conv_w", "conv_in", "conv_out")
    assert specs["main_0"]["bias"] == P("conv_out")
    assert specs["main_3"]["scale"] == P("norm") and specs["main_3"]["bias"] == P("norm")

    params = nn.unbox(params)
    kernel = np.asarray(params["main_8"]["kernel"])  # 4*4*64*128 samples
    assert abs(kernel.mean()) < 2e-3 and abs(kernel.std() - 0.02) < 1e-3
    scale = np.asarray(params["main_9"]["scale"])
    assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
    np.testing.assert_array_equal(params["main_9"]["bias"], 0.0)
    np.testing.assert_array_equal(params["main_11"]["bias"], 0.0)

    logits, _ = jax.jit(_train_apply(model))(variables, x)
    assert logits.shape == (2, 6, 6, 1) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    big = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)  # as PyTorch: 256 -> 30
    logits, _ = jax.eval_shape(_train_apply(model), variables, big)
    assert logits.shape == (2, 30, 30, 1)


def test_batch_stats_update_in_train_only():
    model = NLayerDiscriminator(ndf=4, n_layers=2)
    x = 0.5 + jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    before = variables["batch_stats"]
    np.testing.assert_array_equal(before["main_3"]["mean"], 0.0)

    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    after = updates["batch_stats"]
    assert logits.shape == (2, 2, 2, 1)
    assert float(jnp.abs(after["main_3"]["mean"]).max()) > 0
    assert float(jnp.abs(after["main_3"]["var"] - 1.0).max()) > 0

    # eval mode reads the running averages (initially mean 0, var 1), mutates nothing
    eval_logits = model.apply(variables, x, train=False)
    assert eval_logits.shape == (2, 2, 2, 1) and np.all(np.isfinite(eval_logits))
    assert float(jnp.abs(eval_logits - logits).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params():
    model = NLayerDiscriminator(ndf=4, n_layers=2, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(variables)))
    logits, _ = jax.eval_shape(_train_apply(model), variables, x)
    assert logits.dtype == jnp.float32
