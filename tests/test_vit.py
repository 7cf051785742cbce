"""ViT-VQGAN (Yu et al. 2021): parameter counts of the paper's sizes from the architecture
formula, the tokenizer interface the rest of the code calls, windows, config checks, a ViT
tokenizer workdir read by stage 2 (EMA weights preferred), and two jitted train steps with the
StyleGAN discriminator, R1, LeCAM and the generator EMA."""

import functools
import importlib.util
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from conftest import CONFIG_DIR, load_config, shrink
from vqgan_jax import parallel
from vqgan_jax import workdir as workdir_lib
from vqgan_jax.models import registry
from vqgan_jax.models.lpips import load_lpips_params
from vqgan_jax.models.vit_vqgan import ViTVQModel, patchify, unpatchify
from vqgan_jax.state import tokenizer as state1
from vqgan_jax.state import transformer as state2
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T
from vqgan_jax.trainers import transformer as stage2

TINY = dict(patch_size=4, enc_layers=1, enc_width=16, enc_heads=2, enc_mlp_dim=32,
            dec_layers=1, dec_width=24, dec_heads=2, dec_mlp_dim=40, embed_dim=4, n_embed=32)


def vit_param_count(m, resolution: int) -> int:
    """ViTVQModel's parameters from the architecture, independently of the module.

    A pre-LN block of width d and MLP width m: two LayerNorms (2d each), qkv (3d^2 + 3d),
    the attention projection (d^2 + d) and the MLP (dm + m + md + d): 4d^2 + 2dm + 9d + m
    (12d^2 + 13d with m = 4d). A transformer: position table (n d, n tokens a window), the
    blocks, the final LayerNorm (2d). Encoder: patch embedding (3p^2 d + d), transformer,
    head Dense d -> m, Dense m -> d. Decoder: transformer, head Dense d -> m, to_pixels
    Dense m -> 3p^2. Codes: quant_proj (d_enc e + e), codebook (K e), post_quant_proj
    (e d_dec + d_dec).
    """
    p, e = m["patch_size"], m["embed_dim"]
    n = (resolution // p) ** 2
    pix = 3 * p * p

    def transformer(layers, d, mlp):
        return n * d + layers * (4 * d * d + 2 * d * mlp + 9 * d + mlp) + 2 * d

    de, me = m["enc_width"], m["enc_mlp_dim"]
    dd, md = m["dec_width"], m["dec_mlp_dim"]
    encoder = pix * de + de + transformer(m["enc_layers"], de, me) + de * me + me + me * de + de
    decoder = transformer(m["dec_layers"], dd, md) + dd * md + md + md * pix + pix
    codes = de * e + e + m["n_embed"] * e + e * dd + dd
    return encoder + decoder + codes


# The formula's values for the paper's pairs at 256x256 (8x8 patches, 8192 codes of dim 32).
PAPER_COUNTS = {"SS": 55_426_784, "SB": 117_041_632, "LL": 1_283_230_688}


def vit_imagenet_config(pair: str):
    spec = importlib.util.spec_from_file_location("vit_imagenet",
                                                  CONFIG_DIR / "vitvqgan_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(pair)


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("pair, sizes", [
    ("SS", ((8, 512, 8, 2048), (8, 512, 8, 2048))),
    ("SB", ((8, 512, 8, 2048), (12, 768, 12, 3072))),
    ("LL", ((32, 1280, 16, 5120), (32, 1280, 16, 5120))),
])
def test_paper_configs_have_the_paper_sizes_and_counts(pair, sizes):
    config = vit_imagenet_config(pair)
    T.validate_config(config, num_devices=1)
    m = config.model
    assert config.arch == "vit_vqgan" and config.disc.kind == "stylegan"
    assert (m.patch_size, m.embed_dim, m.n_embed, config.image_size) == (8, 32, 8192, 256)
    for part, (layers, width, heads, mlp) in zip(("enc", "dec"), sizes):
        assert (m[f"{part}_layers"], m[f"{part}_width"], m[f"{part}_heads"],
                m[f"{part}_mlp_dim"]) == (layers, width, heads, mlp)
    loss = config.loss  # Yu et al. 2021 sec. 3.3: L_VQ + 0.1 adv + 0.1 LPIPS + 0.1 LL + 1.0 L2
    assert (loss.codebook_weight, loss.disc_weight, loss.perceptual_weight,
            loss.logit_laplace_weight, loss.l2_weight, loss.l1_weight) == (1, 0.1, 0.1, 0.1, 1, 0)
    assert not loss.adaptive_disc_weight
    vq, _ = registry.build_models(config)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    abstract = jax.eval_shape(vq.init, jax.random.key(0), x)
    assert n_params(abstract) == vit_param_count(m, 256) == PAPER_COUNTS[pair]
    codes = jax.eval_shape(functools.partial(vq.apply, method="encode_to_indices"), abstract, x)
    assert codes.shape == (1, 32, 32) and codes.dtype == jnp.int32


def test_patchify_matches_numpy_and_inverts():
    x = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    t = np.asarray(patchify(jnp.asarray(x), 4))
    assert t.shape == (2, 2, 3, 48)
    np.testing.assert_array_equal(t[1, 1, 2], x[1, 4:8, 8:12].reshape(-1))
    np.testing.assert_array_equal(unpatchify(jnp.asarray(t), 4), x)


@pytest.fixture(scope="module")
def tiny_vit():
    model = ViTVQModel(**TINY, resolution=16)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return model, variables


def test_vit_interface_shapes_and_logical_axes(tiny_vit):
    model, variables = tiny_vit
    params = variables["params"]
    assert n_params(params) == vit_param_count(TINY, 16)
    specs = nn.get_partition_spec(params)
    assert specs["encoder"]["patch_embed"]["kernel"] == P(None, "embed")
    block = specs["encoder"]["transformer"]["block_0"]
    assert block["attn"]["qkv"]["kernel"] == P("embed", "heads")
    assert block["attn"]["proj"]["kernel"] == P("heads", "embed")
    assert block["fc"]["kernel"] == P("embed", "mlp") and block["ln_1"]["scale"] == P("embed")
    assert specs["quantize"]["codebook"] == P("codebook_n", "codebook_d")

    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)

    def every_method(m, x):  # one compile for all of them
        z_q, aux = m.encode(x)
        h = m.decoder_features(z_q)
        indices = m.encode_to_indices(x)
        return dict(z_q=z_q, aux=aux, x_hat=m.decode(z_q), h=h, last=m.last_layer(h),
                    indices=indices, from_indices=m.decode_from_indices(indices),
                    codes=m.quantize.lookup(indices), call=m(x)[0])

    o = jax.jit(functools.partial(model.apply, method=every_method))(variables, x)
    z_q, aux, x_hat = o["z_q"], o["aux"], o["x_hat"]
    assert z_q.shape == (2, 4, 4, 4) and aux["z_e"].shape == (2, 4, 4, 4)
    np.testing.assert_allclose(np.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-5)  # l2-normalized
    assert {"indices", "vq_loss", "perplexity", "codebook_usage"} <= set(aux)
    assert x_hat.shape == x.shape and o["h"].shape == (2, 4, 4, 40)
    np.testing.assert_allclose(o["last"], x_hat, rtol=1e-5, atol=1e-6)
    last = T._get_path(nn.unbox(params), model.last_layer_path)
    assert last["kernel"].shape == (40, 48)
    assert o["indices"].shape == (2, 4, 4) and o["indices"].dtype == jnp.int32
    np.testing.assert_array_equal(o["indices"], aux["indices"])
    np.testing.assert_allclose(o["from_indices"], x_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o["codes"], z_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o["call"], x_hat, rtol=1e-5, atol=1e-6)
    assert model.downsample_factor == 4 and model.n_embed == 32


def test_larger_images_are_processed_in_training_size_windows(tiny_vit):
    """A 32x40 image (8x10 tokens, windows of 4x4) = its 16x16 tiles encoded alone; the last
    column of windows is edge-padded and cropped. Decoding likewise."""
    model, variables = tiny_vit
    x = jax.random.uniform(jax.random.key(2), (1, 32, 40, 3), minval=-1, maxval=1)
    corners = ((0, 0), (16, 16), (16, 0))

    def windows(m, x):  # one compile
        indices = m.encode_to_indices(x)
        tiles = [m.encode_to_indices(x[:, r:r + 16, c:c + 16]) for r, c in corners]
        return (indices, tiles, m.decode_from_indices(indices),
                m.decode_from_indices(indices[:, 4:8, 4:8]))

    indices, tiles, images, tile_image = jax.jit(functools.partial(
        model.apply, method=windows))(variables, x)
    assert indices.shape == (1, 8, 10)
    for (r, c), tile in zip(corners, tiles):
        np.testing.assert_array_equal(indices[:, r // 4:r // 4 + 4, c // 4:c // 4 + 4], tile)
    assert images.shape == (1, 32, 40, 3)
    np.testing.assert_allclose(images[:, 16:32, 16:32], tile_image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("arch", "vit", r"config.arch='vit'; use one of \['vit_vqgan', 'vqgan'\]"),
    ("disc.kind", "wgan", r"config.disc.kind='wgan'; use one of \['patchgan', 'stylegan'\]"),
    ("loss.gen_loss", "wgan", r"config.loss.gen_loss='wgan'; use one of \['hinge', "),
    ("loss.disc_loss", "wgan", r"config.loss.disc_loss='wgan'; use one of \['hinge', "),
    ("loss.r1_every", 0, "config.loss.r1_every"),
    ("loss.ema_decay", 1.0, "config.loss.ema_decay"),
    ("model.patch_size", 12, "config.model.patch_size"),
    ("model.dec_heads", 5, "config.model.dec_heads"),
    ("image_size", 248, "needs a power of two"),
])
def test_bad_vit_config_fails_naming_the_field(field, value, message):
    config = load_config("vitvqgan_demo")
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        T.validate_config(config, num_devices=1)


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def lpips_params():
    return load_lpips_params()


@pytest.fixture(scope="module")
def vit_setup():
    """A tiny ViT-VQGAN step config with everything on, its fresh state and a batch.

    A test that donates the state passes a copy.
    """
    config = shrink(load_config("vitvqgan_demo"))
    config.image_size = 16  # 4x4 tokens; StyleGAN blocks at 16 and 8
    config.model.update(enc_width=16, dec_width=16, enc_mlp_dim=32, dec_mlp_dim=32)
    config.disc.update(channel_base=128, channel_max=16)
    config.loss.update(disc_start=0, adaptive_disc_weight=True, r1_weight=1.0, r1_every=2,
                       lecam_weight=0.5, lecam_ema_decay=0.9, ema_decay=0.5)
    T.validate_config(config, num_devices=1)
    sc = state1.build_step_config(config)
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    state, shardings = loop.create_sharded_state(
        functools.partial(state1.init_state, sc=sc, image_size=16), jax.random.key(0), mesh)
    images = np.random.default_rng(3).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    return sc, mesh, state, shardings, parallel.global_batch({"image": images}, mesh)


def test_two_jitted_vit_steps_with_stylegan_r1_lecam_and_ema(lpips_params, vit_setup):
    sc, mesh, state, shardings, batch = vit_setup
    state = jax.tree.map(jnp.copy, state)  # the step donates it
    assert isinstance(sc.vq, ViTVQModel) and state.d_batch_stats == {}
    np.testing.assert_array_equal(state.lecam_ema, [0.0, 0.0])
    step = T.jit_train_step(sc, mesh, shardings, lpips_params)
    p0 = jax.device_get(state.g_params)
    state, m1 = step(state, batch, lpips_params)
    s1 = jax.device_get(state)
    state, m2 = step(state, batch, lpips_params)
    s2 = jax.device_get(state)
    for m in (m1, m2):
        assert all(np.isfinite(float(v)) for v in m.values()) and float(m["nonfinite"]) == 0
        assert float(m["disc_factor"]) == 1.0 and float(m["d_loss"]) > 0
        assert float(m["logit_laplace_loss"]) != 0 and float(m["lecam_loss"]) >= 0
    # R1 on step 0 (0 % r1_every == 0), not on step 1.
    assert float(m1["r1_penalty"]) > 0 and float(m2["r1_penalty"]) == 0
    # EMA (decay 0.5): 0.5 * previous EMA + 0.5 * the updated weights; it trails the weights.
    for ema, prev, new in ((s1.g_ema_params, p0, s1.g_params),
                           (s2.g_ema_params, s1.g_ema_params, s2.g_params)):
        for e, a, b in zip(*map(jax.tree.leaves, (ema, prev, new))):
            np.testing.assert_allclose(e, 0.5 * a + 0.5 * b, rtol=1e-6, atol=1e-7)
    diff = lambda a, b: sum(float(np.sum((x - y) ** 2)) for x, y in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert 0 < diff(s2.g_ema_params, s2.g_params) < diff(p0, s2.g_params)
    # LeCAM anchors: EMA (decay 0.9) of the mean logits, from 0.
    expected = 0.1 * np.array([m1["logits_real"], m1["logits_fake"]])
    np.testing.assert_allclose(s1.lecam_ema, expected, rtol=1e-5)
    np.testing.assert_allclose(
        s2.lecam_ema, 0.9 * expected + 0.1 * np.array([m2["logits_real"], m2["logits_fake"]]),
        rtol=1e-5)
    assert state1.eval_params(s2) is s2.g_ema_params


def test_fused_vit_step_matches_reference_gradients(lpips_params, vit_setup):
    """R1 (on at step 0), LeCAM with nonzero anchors, the adaptive weight through the ViT
    decoder's last Dense, non-saturating losses: fused == taming's unfused computation."""
    sc, _, state, _, batch = vit_setup
    state = state.replace(lecam_ema=jnp.array([0.3, -0.2], jnp.float32))
    g_grads, d_grads, _, metrics, _ = jax.jit(functools.partial(T.compute_grads, sc=sc))(
        state, batch, lpips_params)
    g_ref, d_ref, d_weight = jax.jit(functools.partial(T.reference_grads, sc=sc))(
        state, batch, lpips_params)
    assert float(metrics["r1_penalty"]) > 0 and float(metrics["lecam_loss"]) > 0
    np.testing.assert_allclose(float(metrics["d_weight"]), float(d_weight), rtol=1e-4)
    for got, ref in ((g_grads, g_ref), (d_grads, d_ref)):
        scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- stage 2

@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_stage2_reads_a_vit_tokenizer_workdir(tmp_path, ema_decay):
    """A ViT tokenizer workdir builds the GPT's vocabulary and grid; load_frozen reads the
    generator EMA when the run kept one; codes and decoded images have the right shapes."""
    config = load_config("vitvqgan_demo")
    config.update(image_size=16)
    config.model.update(TINY)
    config.loss.ema_decay = ema_decay
    T.validate_config(config, num_devices=1)
    vq = registry.build_models(config)[0]
    abstract = jax.eval_shape(lambda: nn.meta.unbox(vq.init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]))
    rng = np.random.default_rng(0)
    g_params, g_ema = (jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                                    abstract) for _ in range(2))
    state = dict(step=jnp.ones((), jnp.int32), g_params=g_params)
    if ema_decay:
        state["g_ema_params"] = g_ema
    manager = workdir_lib.checkpoint_manager(str(tmp_path), max_to_keep=1,
                                      item_names=("state", "data", "config"))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()
    manager.close()

    gpt_config = load_config("demo_transformer")
    gpt_config.update(tokenizer_workdir=str(tmp_path), image_size=16, num_classes=2)
    gpt_config.model.update(block_size=16, n_layer=1, n_head=2, n_embd=16)
    state2.validate_config(gpt_config, num_devices=1)
    sc = state2.build_step_config(gpt_config)
    assert isinstance(sc.vq, ViTVQModel) and sc.grid == (4, 4) and sc.gpt.vocab_size == 32
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    frozen, _ = state2.load_frozen(gpt_config, sc, mesh)
    expected = g_ema if ema_decay else g_params
    for a, b in zip(jax.tree.leaves(frozen["tokenizer"]), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32),
             "label": jnp.array([0, 1])}
    prefix, codes = jax.jit(functools.partial(stage2.prefix_and_codes, sc=sc, rng=None))(
        batch, frozen)
    assert prefix.shape == (2, 1) and codes.shape == (2, 16)
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    images = jax.jit(lambda p, c: sc.vq.apply({"params": p}, c, method="decode_from_indices"))(
        frozen["tokenizer"], codes.reshape(2, 4, 4))
    assert images.shape == (2, 16, 16, 3) and np.all(np.isfinite(images))
