"""Scale: (data, fsdp, tensor) meshes give the single-device results, FSDP shrinks per-device
state, the GPT's tensor axis shards its matrices, remat changes nothing, and the step is
compiled ahead with its memory analysis."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import load_config, shrink
from vqgan_jax import parallel
from vqgan_jax import workdir as workdir_lib
from vqgan_jax.config_base import TRANSFORMER_RULES
from vqgan_jax.models import registry
from vqgan_jax.models.gpt import GPT
from vqgan_jax.models.vqgan import VQModel
from vqgan_jax.state import tokenizer as state1
from vqgan_jax.state import transformer as state2
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T1
from vqgan_jax.trainers import transformer as T2

MESHES = ((8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 8, 1))   # (data, fsdp, tensor) on 8 devices


def init_key(seed: int) -> jax.Array:
    """An RBG key for parameter init: XLA's CPU backend compiles an init of many threefry draws
    3-4x slower (18 s vs 5 s for a tiny VQModel); the values do not matter here."""
    return jax.random.key(seed, impl="rbg")


def one_device_mesh():
    return parallel.create_mesh(devices=jax.devices()[:1])


def relative_error(a, b) -> float:
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
            for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- stage 1

def tokenizer_config():
    """16x16 images, shrink's one level of 32 channels (32-channel 3x3 kernels are big enough
    to shard) with attention in the mid-blocks."""
    config = shrink(load_config("demo"))
    config.image_size = 16
    config.model.update(n_embed=16, l2_normalize_codes=False, norm_groups=8)
    config.disc.update(ndf=8, n_layers=1)
    config.loss.update(disc_start=0, perceptual_weight=0.0)
    return config


@functools.cache
def tokenizer_setup():
    """The tiny tokenizer's step config (SGD: Adam's first step is lr * sign(g), which turns
    rounding-level gradients into +-lr), rules, initial state on the host, boxed abstract state
    and a batch of images. Made once: every mesh gets the same state by device_put."""
    config = tokenizer_config()
    sc = dataclasses.replace(state1.build_step_config(config), g_tx=optax.sgd(0.1),
                             d_tx=optax.sgd(0.1))
    init = functools.partial(state1.init_state, sc=sc, image_size=config.image_size)
    state = jax.device_get(jax.jit(init)(init_key(0)))
    boxed = jax.eval_shape(functools.partial(init, boxed=True), init_key(0))
    images = np.random.default_rng(7).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    return sc, parallel.rules_from_config(config), state, boxed, images


def tokenizer_step(mesh, workdir=None):
    """One compiled step of the tiny tokenizer on ``mesh``: ``(shardings, new_state, metrics)``."""
    sc, rules, host_state, boxed, images = tokenizer_setup()
    shardings = parallel.state_shardings(boxed, mesh, rules)
    state = jax.device_put(host_state, shardings)
    batch = parallel.global_batch({"image": images}, mesh)
    lpips = {}  # perceptual_weight=0: the step never reads them
    step = loop.compile_step(T1.jit_train_step(sc, mesh, shardings, lpips),
                             (state, batch, lpips), mesh=mesh, rules=rules, workdir=workdir)
    return (shardings, *jax.device_get(step(state, batch, lpips)))


@pytest.fixture(scope="module")
def tokenizer_reference():
    return tokenizer_step(one_device_mesh())[1:]


@pytest.mark.parametrize("shape", MESHES)
def test_tokenizer_step_on_each_mesh_equals_one_device(shape, tokenizer_reference, tmp_path):
    shardings, new_state, metrics = tokenizer_step(parallel.create_mesh(*shape), str(tmp_path))
    ref_state, ref_metrics = tokenizer_reference
    for k in ("loss", "d_loss", "g_loss", "vq_loss", "d_weight"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in ((new_state.g_params, ref_state.g_params), (new_state.d_params, ref_state.d_params),
                 (new_state.d_batch_stats, ref_state.d_batch_stats)):
        assert relative_error(a, b) < 1e-5
    if shape[1] > 1:  # FSDP splits a conv kernel's output channels
        kernel = shardings.g_params["decoder"]["up_0_block_0"]["conv1"]["kernel"]
        assert kernel.spec == P(None, None, None, "fsdp")
    stats = json.loads((tmp_path / "compile_stats.json").read_text())
    assert stats["mesh"] == dict(zip(parallel.MESH_AXES, shape))
    assert stats["flops"] > 0 and stats["argument_bytes"] > 0
    assert {"temp_bytes", "output_bytes", "alias_bytes", "generated_code_bytes"} <= set(stats)


def abstract_state(init, mesh, rules):
    """ShapeDtypeStructs of ``init``'s state carrying the shardings it gets on ``mesh``."""
    boxed = jax.eval_shape(functools.partial(init, boxed=True), jax.random.key(0))
    return workdir_lib.abstract_like(parallel.unbox(boxed),
                                     parallel.state_shardings(boxed, mesh, rules))


def test_tokenizer_state_bytes_per_device_fall_as_fsdp_grows():
    config = tokenizer_config()
    sc = state1.build_step_config(config)  # Adam for both models
    init = functools.partial(state1.init_state, sc=sc, image_size=config.image_size)
    per_device = []
    for fsdp in (1, 2, 8):
        state = abstract_state(init, parallel.create_mesh(-1, fsdp),
                               parallel.rules_from_config(config))
        per_device.append(parallel.per_device_bytes(
            (state.g_params, state.d_params, state.g_opt_state, state.d_opt_state)))
    assert per_device[0] > per_device[1] > per_device[2], per_device


# ----------------------------------------------------------------------------- stage 2

TINY_VQ = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
               embed_dim=8, n_embed=16, norm_groups=8, resolution=8)
TINY_GPT = dict(block_size=16, n_layer=2, n_head=4, n_embd=64)


def gpt_step_config(tx, remat=False):
    vq = VQModel(**TINY_VQ)
    conditioning = registry.Conditioning("class", vq.n_embed, num_classes=2)
    gpt = GPT(vocab_size=vq.n_embed, n_cond_tokens=conditioning.n_cond_tokens, remat=remat,
              **TINY_GPT)
    return state2.StepConfig(gpt=gpt, vq=vq, cond_vq=None, conditioning=conditioning, tx=tx,
                         grid=(4, 4), cond_image_size=0, class_drop_prob=0.5, pkeep=0.8, seed=0)


@functools.cache
def gpt_setup():
    """Like :func:`tokenizer_setup` for the tiny GPT (SGD) and its frozen tokenizer."""
    sc = gpt_step_config(optax.sgd(0.5))
    init = functools.partial(state2.init_state, sc=sc)
    state = jax.device_get(jax.jit(init)(init_key(0)))
    boxed = jax.eval_shape(functools.partial(init, boxed=True), init_key(0))
    x = jnp.zeros((1, 8, 8, 3))
    frozen = {"tokenizer": jax.device_get(jax.jit(lambda k: nn.meta.unbox(
        sc.vq.init(k, x)["params"]))(init_key(1)))}
    frozen_boxed = {"tokenizer": jax.eval_shape(lambda: sc.vq.init(jax.random.key(1), x)["params"])}
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, 2, 8).astype(np.int32)}
    return sc, state, boxed, frozen, frozen_boxed, batch


def gpt_step(mesh):
    """One compiled GPT step on ``mesh``: ``(shardings, new_state, metrics)``."""
    sc, host_state, boxed, host_frozen, frozen_boxed, host_batch = gpt_setup()
    rules = TRANSFORMER_RULES
    shardings = parallel.state_shardings(boxed, mesh, rules)
    frozen_shardings = parallel.state_shardings(frozen_boxed, mesh, rules)
    state = jax.device_put(host_state, shardings)
    frozen = jax.device_put(host_frozen, frozen_shardings)
    batch = parallel.global_batch(host_batch, mesh)
    step = loop.compile_step(T2.jit_train_step(sc, mesh, shardings, frozen_shardings),
                             (state, batch, frozen), mesh=mesh, rules=rules)
    return (shardings, *jax.device_get(step(state, batch, frozen)))


@pytest.fixture(scope="module")
def gpt_reference():
    return gpt_step(one_device_mesh())[1:]


@pytest.mark.parametrize("shape", MESHES)
def test_gpt_step_on_each_mesh_equals_one_device(shape, gpt_reference):
    shardings, new_state, metrics = gpt_step(parallel.create_mesh(*shape))
    ref_state, ref_metrics = gpt_reference
    for k in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert relative_error(new_state.params, ref_state.params) < 1e-5
    data, fsdp, tensor = shape
    spec = shardings.params["h_0"]["c_fc"]["kernel"].spec   # ("embed", "mlp"): [64, 256]
    assert spec == P("fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
    if tensor > 1:
        assert shardings.params["h_0"]["attn"]["c_attn"]["kernel"].spec[1] == "tensor"


def test_gpt_state_bytes_per_device_fall_as_fsdp_grows():
    init = functools.partial(state2.init_state, sc=gpt_step_config(optax.adamw(1e-3)))
    per_device = []
    for fsdp in (1, 2, 8):
        state = abstract_state(init, parallel.create_mesh(-1, fsdp), TRANSFORMER_RULES)
        per_device.append(parallel.per_device_bytes((state.params, state.opt_state)))
        # AdamW's moments are laid out like the parameters they belong to.
        mu = state.opt_state[0].mu["h_0"]["c_fc"]["kernel"]
        assert mu.sharding == state.params["h_0"]["c_fc"]["kernel"].sharding
    assert per_device[0] > per_device[1] > per_device[2], per_device


# ----------------------------------------------------------------------------- remat, errors

def test_remat_gives_the_same_loss_and_gradients():
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    layout = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), z_channels=4,
                  embed_dim=4, n_embed=16, norm_groups=4, resolution=8)
    plain, remat = VQModel(**layout), VQModel(**layout, remat=True)
    params = nn.meta.unbox(jax.jit(plain.init)(init_key(1), x)["params"])
    shapes = lambda model: jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(
        jax.eval_shape(model.init, init_key(1), x)["params"]))
    assert shapes(remat) == shapes(plain)  # the same parameter tree

    def vq_loss(model):
        def f(p):
            x_hat, aux = model.apply({"params": p}, x, True)
            return jnp.mean(jnp.abs(x - x_hat)) + aux["vq_loss"]
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = vq_loss(plain), vq_loss(remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert relative_error(g1, g0) < 1e-5

    sc0, sc1 = gpt_step_config(None), gpt_step_config(None, remat=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 16)))
    gparams = nn.meta.unbox(jax.jit(sc0.gpt.init)(init_key(2), tokens)["params"])

    def gpt_loss(sc):
        f = functools.partial(T2.loss_fn, prefix=16 + tokens[:, :1] % 3, codes=tokens,
                              inputs=tokens, sc=sc, rng=jax.random.key(3))
        return jax.jit(jax.value_and_grad(lambda p: f(p)[0]))(gparams)

    (l0, g0), (l1, g1) = gpt_loss(sc0), gpt_loss(sc1)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert relative_error(g1, g0) < 1e-5


@pytest.mark.parametrize("mesh, message", [
    (dict(data=3, fsdp=2, tensor=1), r"config.mesh \(data=3, fsdp=2, tensor=1\) does not fit"),
    (dict(data=-1, fsdp=-1, tensor=1), "config.mesh: only one"),
    (dict(data=-1, fsdp=3, tensor=1), "does not fit the 8"),
])
def test_mesh_that_does_not_fit_the_devices_fails_before_compiling(mesh, message, tmp_path,
                                                                  monkeypatch):
    config = tokenizer_config()
    config.mesh.update(mesh)
    monkeypatch.setattr(loop, "compile_step", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=message):
        T1.train_and_evaluate(config, str(tmp_path))


def test_bad_rules_and_undividable_dims_never_make_invalid_shardings():
    config = tokenizer_config()
    config.sharding_rules = (("conv_out", "model"),)
    with pytest.raises(ValueError, match="config.sharding_rules.*'model'"):
        parallel.rules_from_config(config)
    mesh = parallel.create_mesh(2, 4, 1)
    rules = (("a", ("data", "fsdp")), ("b", "fsdp"))
    assert parallel.mesh_spec(("a", "b"), (8, 4096), mesh, rules) == P(("data", "fsdp"), None)
    # "a" takes fsdp first, so "b" finds it used; 6 rows fit data (2) but not data x fsdp (8).
    assert parallel.mesh_spec(("a", "b"), (6, 4096), mesh, rules) == P("data", None)
    assert parallel.mesh_spec(("a", "b"), (3, 4098), mesh, rules) == P(None, None)
    assert parallel.mesh_spec(("new_name", "b"), (4096, 8), mesh, rules) == P(None, "fsdp")
    assert parallel.mesh_spec(("a", "b"), (4, 8), mesh, rules) == P()  # small: replicated
