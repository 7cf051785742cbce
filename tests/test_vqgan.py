"""The conv VQGAN: shapes, exact parameter counts, quantizer gradients, index round-trip."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vqgan_jax.models.quantizers import VectorQuantizer, codebook_stats
from vqgan_jax.models.vqgan import VQModel


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def abstract_params(model, size):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("name, n_embed, total", [("imagenet_f16", 1024, 72_141_699),
                                                  ("imagenet_f16_16384", 16384, 76_073_859)])
def test_taming_parameter_counts(name, n_embed, total):
    config = load_config(name)
    model = VQModel(**config.model.to_dict(), resolution=config.image_size)
    params = abstract_params(model, config.image_size)
    assert config.model.n_embed == n_embed
    assert count(params) == total
    assert count(params["encoder"]) == 29_298_176
    assert count(params["decoder"]) == 42_449_795
    assert count(params["quantize"]) == n_embed * 256
    assert count(params["quant_conv"]) == count(params["post_quant_conv"]) == 65_792


def test_taming_parameter_names_and_shapes():
    params = abstract_params(VQModel(), 256)
    enc, dec = params["encoder"], params["decoder"]
    assert enc["conv_in"]["kernel"].shape == (3, 3, 3, 128)
    assert enc["down_2_block_0"]["nin_shortcut"]["kernel"].shape == (1, 1, 128, 256)
    assert enc["down_3_downsample"]["conv"]["kernel"].shape == (3, 3, 256, 256)
    assert set(enc["down_4_attn_0"]) == {"norm", "q", "k", "v", "proj_out"}
    assert set(enc["mid"]) == {"block_1", "attn_1", "block_2"}
    assert "down_4_downsample" not in enc and "up_0_upsample" not in dec
    assert dec["conv_in"]["kernel"].shape == (3, 3, 256, 512)
    assert dec["up_4_block_2"]["conv1"]["kernel"].shape == (3, 3, 512, 512)
    assert dec["conv_out"]["kernel"].shape == (3, 3, 128, 3)
    assert params["quantize"]["codebook"].shape == (1024, 256)


def tiny_model(**kw):
    args = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
                embed_dim=4, n_embed=16, resolution=16)
    return VQModel(**{**args, **kw})


def test_shapes_and_every_public_method():
    model = tiny_model()
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(0), x)
    x_hat, aux = model.apply(variables, x)
    assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32
    assert aux["z_e"].shape == aux["z_q"].shape == (2, 8, 8, 4)
    assert aux["indices"].shape == (2, 8, 8) and aux["indices"].dtype == jnp.int32
    assert 1.0 <= float(aux["perplexity"]) <= 16.0
    assert 0.0 < float(aux["codebook_usage"]) <= 1.0
    indices = model.apply(variables, x, method=VQModel.encode_to_indices)
    np.testing.assert_array_equal(indices, aux["indices"])
    from_indices = model.apply(variables, indices, method=VQModel.decode_from_indices)
    np.testing.assert_allclose(from_indices, x_hat, atol=1e-5)
    # z_q holds exactly the chosen codes.
    codebook = nn.meta.unbox(variables)["params"]["quantize"]["codebook"]
    np.testing.assert_allclose(aux["z_q"], codebook[aux["indices"]], atol=1e-6)
    # Non-square images of any size divisible by f work (the model is convolutional).
    y, _ = model.apply(variables, jnp.zeros((1, 24, 40, 3)))
    assert y.shape == (1, 24, 40, 3)
    assert model.downsample_factor == 2


def test_bfloat16_compute_keeps_float32_params():
    model = tiny_model(dtype=jnp.bfloat16)
    x = jnp.zeros((1, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    assert {p.dtype for p in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype(jnp.float32)}
    x_hat, aux = model.apply(variables, x)
    assert x_hat.dtype == jnp.bfloat16 and aux["indices"].dtype == jnp.int32


def _quantizer_setup(beta=0.25):
    vq = VectorQuantizer(n_embed=5, embed_dim=3, beta=beta)
    z_e = jax.random.normal(jax.random.key(2), (4, 3))
    params = vq.init(jax.random.key(0), z_e)
    params = jax.tree.map(lambda p: p * 100.0, nn.meta.unbox(params))  # spread the codes
    return vq, params, z_e


def test_quantizer_picks_nearest_code_in_float64_reference():
    vq, params, z_e = _quantizer_setup()
    _, aux = vq.apply(params, z_e)
    codebook = np.asarray(params["params"]["codebook"], np.float64)
    d = ((np.asarray(z_e, np.float64)[:, None, :] - codebook[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(aux["indices"], d.argmin(-1))


def test_quantizer_losses_send_gradients_to_the_right_place():
    vq, params, z_e = _quantizer_setup(beta=0.25)
    codebook = np.asarray(params["params"]["codebook"])

    def term(name):
        def f(params, z_e):
            return vq.apply(params, z_e)[1][name]
        return jax.grad(f, argnums=(0, 1))(params, z_e)

    _, aux = vq.apply(params, z_e)
    e = codebook[np.asarray(aux["indices"])]
    n = z_e.size
    # Codebook term ||sg[z_e] - e||^2: gradient on the codebook only.
    g_params, g_z = term("codebook_loss")
    np.testing.assert_allclose(g_z, 0.0)
    expected = np.zeros_like(codebook)
    np.add.at(expected, np.asarray(aux["indices"]), 2.0 * (e - np.asarray(z_e)) / n)
    np.testing.assert_allclose(g_params["params"]["codebook"], expected, rtol=1e-5, atol=1e-7)
    # Commitment term beta * ||z_e - sg[e]||^2: gradient on the encoder output only.
    g_params, g_z = term("commitment_loss")
    np.testing.assert_allclose(g_params["params"]["codebook"], 0.0)
    np.testing.assert_allclose(g_z, 0.25 * 2.0 * (np.asarray(z_e) - e) / n, rtol=1e-5)


def test_straight_through_estimator_copies_gradients():
    vq, params, z_e = _quantizer_setup()
    w = jax.random.normal(jax.random.key(3), z_e.shape)
    g = jax.grad(lambda z: jnp.sum(vq.apply(params, z)[0] * w))(z_e)
    np.testing.assert_allclose(g, w, rtol=1e-6)


def test_l2_normalized_codes_have_unit_norm():
    vq = VectorQuantizer(n_embed=7, embed_dim=4, l2_normalize=True)
    z_e = jax.random.normal(jax.random.key(0), (2, 3, 4)) * 5
    params = vq.init(jax.random.key(1), z_e)
    z_q, _ = vq.apply(params, z_e)
    np.testing.assert_allclose(jnp.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-5)


def test_codebook_stats_against_direct_formula():
    indices = jnp.array([0, 0, 1, 3, 3, 3])
    perplexity, usage = codebook_stats(indices, 8)
    p = np.array([2, 1, 3]) / 6
    np.testing.assert_allclose(perplexity, np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    assert float(usage) == 3 / 8


def _conv3x3_same_f64(x, kernel):
    """float64 reference: ``[B, H, W, C_in] * [3, 3, C_in, C_out]``, zero 'same' padding."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return sum(xp[:, dy:dy + h, dx:dx + w] @ kernel[dy, dx] for dy in range(3) for dx in range(3))


def test_upsample_is_nearest_repeat_then_conv():
    """The sub-pixel Upsample against its definition, taming's ``interpolate(nearest) + conv``,
    computed in float64; the bound is float32 rounding of a sum of 9 * C_in products (each tap
    a sum of up to 3 kernel taps), times the sum of the products' magnitudes."""
    from vqgan_jax.models.blocks import Upsample
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 7, 16)).astype(np.float32)
    params = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
        nn.meta.unbox(Upsample().init(jax.random.key(0), x)))
    y = np.asarray(jax.jit(Upsample().apply)(params, x), np.float64)
    kernel = np.asarray(params["params"]["conv"]["kernel"], np.float64)
    bias = np.asarray(params["params"]["conv"]["bias"], np.float64)
    up = np.repeat(np.repeat(x.astype(np.float64), 2, axis=1), 2, axis=2)
    ref = _conv3x3_same_f64(up, kernel) + bias
    magnitude = _conv3x3_same_f64(np.abs(up), np.abs(kernel)) + np.abs(bias)
    assert y.shape == (2, 10, 14, 16)
    bound = (9 * 16 + 3) * np.finfo(np.float32).eps * magnitude
    assert np.all(np.abs(y - ref) <= bound)


@pytest.mark.parametrize("kernel_size, stride, padding", [(3, 1, "SAME"), (3, 2, "VALID"),
                                                          (1, 1, "SAME")])
def test_conv_is_nn_conv_with_its_parameters_and_gradients(kernel_size, stride, padding):
    """blocks.Conv initialises exactly as nn.Conv (same names, same draws) and gives its
    output; the bias gradient (a matrix-vector product) is the float64 sum of the output
    gradient within float32 rounding of a sum of B*H*W terms."""
    from vqgan_jax.models.blocks import Conv, _torch_conv_init
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 8)), jnp.float32)
    ours = Conv(16, kernel_size, stride, padding)
    ref = nn.Conv(16, (kernel_size,) * 2, strides=(stride,) * 2, padding=padding,
                  kernel_init=_torch_conv_init)
    params = nn.meta.unbox(ours.init(jax.random.key(0), x))
    assert jax.tree.all(jax.tree.map(np.array_equal, params, ref.init(jax.random.key(0), x)))
    params = jax.tree.map(lambda p: p + 0.1, params)
    y = ours.apply(params, x)
    np.testing.assert_allclose(y, ref.apply(params, x), rtol=1e-6, atol=1e-6)
    g = np.random.default_rng(2).normal(size=y.shape).astype(np.float32)
    bias_grad = jax.vjp(lambda p: ours.apply(p, x), params)[1](jnp.asarray(g))[0]["params"]["bias"]
    exact = g.astype(np.float64).sum(axis=(0, 1, 2))
    bound = g[..., 0].size * np.finfo(np.float32).eps * np.abs(g).astype(np.float64).sum((0, 1, 2))
    assert np.all(np.abs(np.asarray(bias_grad, np.float64) - exact) <= bound)


def _group_norm_f64(x, scale, bias, groups, w, eps=1e-6):
    """GroupNorm (Wu & He 2018, eq. 1-4) and the gradient of sum(w * GroupNorm(x)) in float64:
    ``(y, dx, dscale, dbias)``."""
    b, h, wd, c = x.shape
    xg = x.reshape(b, h * wd, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    rstd = 1 / np.sqrt(xg.var(axis=(1, 3), keepdims=True) + eps)
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    y = xhat * scale + bias
    dxhat = (w * scale).reshape(xg.shape)
    xh = xhat.reshape(xg.shape)
    dx = rstd * (dxhat - dxhat.mean(axis=(1, 3), keepdims=True)
                 - xh * (dxhat * xh).mean(axis=(1, 3), keepdims=True))
    return y, dx.reshape(x.shape), (w * xhat).sum(axis=(0, 1, 2)), w.sum(axis=(0, 1, 2))


@pytest.mark.parametrize("shape, groups", [((2, 8, 8, 64), 32), ((3, 5, 7, 16), 4)])
@pytest.mark.parametrize("dots", [True, False])
def test_group_norm_is_flax_group_norm_and_the_float64_reference(shape, groups, dots,
                                                                 monkeypatch):
    """blocks.GroupNorm has flax's parameters (names, shapes, initial values) and computes
    GroupNorm and its gradients: against the float64 formulas, each group's statistics are
    float32 sums of n = H*W*C/G terms (through dots on CPU), so outputs and input gradients
    may be off by n * eps relative to their magnitudes, and the scale and bias gradients
    (sums over B*H*W) by B*H*W * eps of the sum of their terms' magnitudes. ``dots``: the
    sums as dots (the CPU path) or as reductions (the accelerators')."""
    from vqgan_jax.models import blocks
    from vqgan_jax.models.blocks import GroupNorm
    monkeypatch.setattr(blocks, "_sums_as_dots", lambda: dots)
    rng = np.random.default_rng(3)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    ours, ref = GroupNorm(groups), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    params = nn.meta.unbox(ours.init(jax.random.key(0), x))
    assert jax.tree.all(jax.tree.map(np.array_equal, params, ref.init(jax.random.key(0), x)))
    scale = (rng.normal(size=shape[-1]) + 1).astype(np.float32)
    bias = rng.normal(size=shape[-1]).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}

    def loss(module, params, x):
        y = module.apply(params, x)
        return jnp.sum(y * w), y
    (_, y), (dp, dx) = jax.jit(jax.value_and_grad(
        functools.partial(loss, ours), argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    y64, dx64, dscale64, dbias64 = _group_norm_f64(
        x.astype(np.float64), scale.astype(np.float64), bias.astype(np.float64), groups,
        w.astype(np.float64))
    eps = np.finfo(np.float32).eps
    n = shape[1] * shape[2] * shape[-1] // groups
    m = shape[0] * shape[1] * shape[2]
    np.testing.assert_allclose(y, y64, rtol=0, atol=4 * n * eps * np.abs(y64).max())
    np.testing.assert_allclose(dx, dx64, rtol=0, atol=4 * n * eps * np.abs(dx64).max())
    dparams = dp["params"]
    magnitude = np.abs(w).astype(np.float64).sum(axis=(0, 1, 2))
    assert np.all(np.abs(dparams["bias"] - dbias64) <= m * eps * magnitude)
    assert np.all(np.abs(dparams["scale"] - dscale64) <= 4 * n * m * eps * magnitude)
    # And flax's own GroupNorm gives the same within the same bound.
    (_, y_flax), (dp_flax, dx_flax) = jax.jit(jax.value_and_grad(
        functools.partial(loss, ref), argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    np.testing.assert_allclose(y, y_flax, rtol=0, atol=8 * n * eps * np.abs(y64).max())
    np.testing.assert_allclose(dx, dx_flax, rtol=0, atol=8 * n * eps * np.abs(dx64).max())
