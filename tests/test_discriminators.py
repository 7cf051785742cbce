"""taming's NLayerDiscriminator (PatchGAN): layout, parameter count, init and BatchNorm; the
StyleGAN2 discriminator: layout, minibatch stddev against numpy, equalized learning rate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vqgan_jax.models.discriminators import (EqualizedConv, EqualizedDense, NLayerDiscriminator,
                                             StyleGANDiscriminator, minibatch_stddev)


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


# ----------------------------------------------------------------------------- StyleGAN2

def test_stylegan_output_shape_names_and_channel_schedule():
    model = StyleGANDiscriminator(channel_base=256, channel_max=32)
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert set(variables) == {"params"}  # no batch_stats
    params = nn.unbox(variables["params"])
    assert set(params) == {"from_rgb", "conv", "fc", "out"} | {
        f"block_{r}_{n}" for r in (16, 8) for n in ("conv0", "conv1", "skip")}
    # C(r) = min(256 // r, 32): 16 at 16, 32 at 8 and 4
    assert params["from_rgb"]["kernel"].shape == (1, 1, 3, 16)
    assert params["block_16_conv1"]["kernel"].shape == (3, 3, 16, 32)
    skip = params["block_16_skip"]
    assert skip["kernel"].shape == (1, 1, 16, 32) and "bias" not in skip
    assert params["conv"]["kernel"].shape == (3, 3, 33, 32)  # + 1 minibatch-stddev channel
    assert params["fc"]["kernel"].shape == (32 * 16, 32)
    assert params["out"]["kernel"].shape == (32, 1)
    kernel = np.asarray(params["block_8_conv0"]["kernel"])  # stored N(0, 1)
    assert abs(kernel.mean()) < 0.05 and abs(kernel.std() - 1.0) < 0.05
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (4, 1) and logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    specs = nn.get_partition_spec(variables["params"])
    assert specs["block_8_conv0"]["kernel"] == P("conv_h", "conv_w", "conv_in", "conv_out")
    bf16 = StyleGANDiscriminator(channel_base=256, channel_max=32, dtype=jnp.bfloat16)
    assert jax.eval_shape(bf16.apply, variables, x).dtype == jnp.float32


def test_minibatch_stddev_against_numpy():
    x = np.random.default_rng(0).normal(size=(8, 3, 3, 6)).astype(np.float32)
    out = np.asarray(jax.jit(minibatch_stddev, static_argnums=(1, 2))(x, 4, 2))
    assert out.shape == (8, 3, 3, 8)
    np.testing.assert_array_equal(out[..., :6], x)
    x64 = x.astype(np.float64)
    for i in range(8):
        group = x64[i % 2::2]           # StyleGAN2: sample i is in group i % (B / G)
        for f in range(2):
            std = np.sqrt(group[..., 3 * f:3 * f + 3].var(axis=0) + 1e-8).mean()
            np.testing.assert_allclose(out[i, :, :, 6 + f], std, rtol=1e-5)
    # groups of min(group_size, B): a batch of 2 is one group
    out2 = np.asarray(minibatch_stddev(x[:2], 4, 1))
    np.testing.assert_allclose(out2[0, 0, 0, 6], np.sqrt(x64[:2].var(axis=0) + 1e-8).mean(),
                               rtol=1e-5)


def test_equalized_lr_scales_weights_by_fan_in_at_run_time():
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 6))
    conv = EqualizedConv(4, 3)
    variables = conv.init(jax.random.key(0), x)
    kernel = np.asarray(nn.unbox(variables["params"])["kernel"])
    bias = np.random.default_rng(1).normal(size=4).astype(np.float32)
    variables = {"params": {"kernel": kernel, "bias": bias}}
    expected = jax.lax.conv_general_dilated(
        x, jnp.asarray(kernel / np.sqrt(3 * 3 * 6)), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    dense = EqualizedDense(3)
    h = jax.random.normal(jax.random.key(3), (2, 10))
    dvars = nn.unbox(dense.init(jax.random.key(0), h))
    np.testing.assert_allclose(
        dense.apply(dvars, h), h @ (dvars["params"]["kernel"] / np.sqrt(10)), rtol=1e-5, atol=1e-6)
