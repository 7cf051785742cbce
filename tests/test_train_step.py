"""The stage-1 train step: adaptive weight and gradients against a direct computation,
sharded == single device, checkpoint round-trip."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import load_config, shrink
from vqgan_jax import parallel
from vqgan_jax import workdir as workdir_lib
from vqgan_jax.models.lpips import load_lpips_params, lpips_fn
from vqgan_jax.state import tokenizer as state1
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T


@pytest.fixture(scope="module")
def lpips_params():
    return load_lpips_params()


def tiny_setup(disc_start=0, devices=None, mesh_shape=(1, 1), **loss):
    """The demo's recipe at shrink's size, LPIPS off unless ``perceptual_weight`` is passed (its
    VGG16 is most of a step's compile; test_configs steps the recipes with it on)."""
    config = shrink(load_config("demo"))
    config.model.l2_normalize_codes = False
    config.loss.update(disc_start=disc_start, perceptual_weight=0.0)
    config.loss.update(loss)
    sc = state1.build_step_config(config)
    mesh = parallel.create_mesh(*mesh_shape, devices=devices or jax.devices()[:1])
    state, shardings = loop.create_sharded_state(
        functools.partial(state1.init_state, sc=sc, image_size=config.image_size),
        jax.random.key(0), mesh, parallel.rules_from_config(config))
    images = jax.random.uniform(jax.random.key(7), (8, 32, 32, 3), minval=-1, maxval=1)
    batch = parallel.global_batch({"image": np.asarray(images)}, mesh)
    return config, sc, mesh, state, shardings, batch


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees, in float64."""
    a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
            for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def direct_adaptive_weight(state, batch, lpips_params, sc) -> float:
    """Esser et al. 2021 eq. 7 in float64 numpy from two full-model gradients."""
    x = batch["image"]

    def losses_of(g_params):
        x_hat, _ = sc.vq.apply({"params": g_params}, x)
        nll = jnp.mean(jnp.abs(x - x_hat))
        if sc.perceptual_weight:  # as the step: no LPIPS pass when its weight is 0
            nll += sc.perceptual_weight * jnp.mean(lpips_fn(lpips_params, x, x_hat))
        logits = sc.disc.apply({"params": state.d_params, "batch_stats": state.d_batch_stats},
                               x_hat, train=True, mutable=["batch_stats"])[0]
        return nll, -jnp.mean(logits)

    # Two separate full-model gradients (jitted: op by op they took 40 s), then numpy.
    kernel_grads = jax.jit(lambda p: [jax.grad(lambda q: losses_of(q)[i])(p)["decoder"][
        "conv_out"]["kernel"] for i in (0, 1)])(state.g_params)
    nll_grad, gan_grad = (np.asarray(g, np.float64) for g in kernel_grads)
    ratio = np.linalg.norm(nll_grad) / (np.linalg.norm(gan_grad) + 1e-4)
    return float(np.clip(ratio, 0, 1e4) * sc.disc_weight)


def test_fused_step_matches_naive_gradients_and_adaptive_weight(lpips_params):
    _, sc, _, state, _, batch = tiny_setup(disc_start=0)
    g_grads, d_grads, _, metrics, _ = jax.jit(functools.partial(T.compute_grads, sc=sc))(
        state, batch, lpips_params)
    g_ref, d_ref, _ = jax.jit(functools.partial(T.reference_grads, sc=sc))(
        state, batch, lpips_params)
    lam = direct_adaptive_weight(state, batch, lpips_params, sc)
    assert float(metrics["disc_factor"]) == 1.0
    assert 0 < lam < 1e4
    np.testing.assert_allclose(float(metrics["d_weight"]), lam, rtol=1e-4)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref))
    assert_trees_close(g_grads, g_ref, rtol=1e-3, atol=1e-5 * scale)
    assert_trees_close(d_grads, d_ref, rtol=1e-3, atol=1e-6)


def test_step_before_disc_start_skips_the_discriminator(lpips_params):
    """Before disc_start the full program weights the adversarial terms 0 and gives the
    discriminator zero gradients; the generator-only program (adversarial=False) gives the full
    program's generator gradients, runs no discriminator, and leaves its whole state untouched."""
    _, sc, mesh, state, shardings, batch = tiny_setup(disc_start=5)
    grads = {adversarial: jax.jit(functools.partial(T.compute_grads, sc=sc, adversarial=adversarial)
                                  ).lower(state, batch, lpips_params).compile()
             for adversarial in (False, True)}
    full = grads[True](state, batch, lpips_params)
    # The full program before disc_start: adversarial terms weighted 0, no discriminator update.
    assert float(full[3]["disc_factor"]) == 0.0 and float(full[3]["d_loss"]) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(full[1]))
    np.testing.assert_allclose(
        float(full[3]["loss"]), float(full[3]["nll_loss"] + full[3]["vq_loss"]), rtol=1e-6)
    g_grads, d_grads, d_stats, metrics, _ = grads[False](state, batch, lpips_params)
    assert d_grads is None
    assert set(metrics) == set(full[3])  # same keys: logged means span the switch
    for k in ("g_loss", "d_loss", "d_weight", "disc_factor", "logits_real", "d_grad_norm"):
        assert float(metrics[k]) == 0.0, k
    for k in ("loss", "nll_loss", "vq_loss", "perceptual_loss", "g_grad_norm"):
        np.testing.assert_allclose(float(metrics[k]), float(full[3][k]), rtol=1e-6, err_msg=k)
    # Both programs carry the same cotangent (dL_rec/dx_hat + 0 * dL_GAN/dx_hat) through the
    # same generator: equal up to float32 rounding of differently fused programs.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full[0]))
    assert_trees_close(g_grads, full[0], rtol=1e-5, atol=1e-6 * scale)
    # Its FLOPs: the discriminator's passes are gone (the optimizer updates the steps add
    # are elementwise, far below the discriminator's convolutions).
    flops = {k: c.cost_analysis()["flops"] for k, c in grads.items()}
    assert flops[False] < flops[True]

    # The generator-only train step leaves the discriminator's whole state untouched.
    before = jax.device_get(state)
    after, _ = jax.device_get(T.jit_train_step(sc, mesh, shardings, lpips_params, False)(
        state, batch, lpips_params))
    for field in ("d_params", "d_batch_stats", "d_opt_state"):
        assert_trees_close(getattr(after, field), getattr(before, field), rtol=0, atol=0)
    assert relative_error(after.g_params, before.g_params) > 0 and int(after.step) == 1


def test_train_step_on_8_devices_equals_1_device(lpips_params):
    """4 data x 2 fsdp devices vs 1: same losses and parameters (relative 1e-5).

    The parameters are compared after an SGD step: Adam's first step is lr * sign(g) per
    element, which turns rounding-level gradients (e.g. of conv biases followed by GroupNorm,
    0 in exact arithmetic) into +-lr on either layout. The Adam step itself runs elementwise
    and is covered by the other tests.
    """
    results = []
    for devices, shape in ((jax.devices()[:1], (1, 1)), (jax.devices()[:8], (4, 2))):
        _, sc, mesh, state, shardings, batch = tiny_setup(devices=devices, mesh_shape=shape)
        sc = dataclasses.replace(sc, g_tx=optax.sgd(0.1), d_tx=optax.sgd(0.1))
        state = state.replace(g_opt_state=sc.g_tx.init(state.g_params),
                              d_opt_state=sc.d_tx.init(state.d_params))
        shardings = shardings.replace(g_opt_state=sc.g_tx.init(state.g_params),
                                      d_opt_state=sc.d_tx.init(state.d_params))
        step = T.jit_train_step(sc, mesh, shardings, lpips_params)
        state, metrics = step(state, batch, lpips_params)
        results.append((jax.device_get(state), jax.device_get(metrics)))
        if shape == (4, 2):  # FSDP really shards: a decoder kernel is split over 'fsdp'.
            assert "fsdp" in state.g_params["decoder"]["up_0_block_0"]["conv1"]["kernel"].sharding.spec
    (s1, m1), (s8, m8) = results
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in ((s8.g_params, s1.g_params), (s8.d_params, s1.d_params),
                 (s8.d_batch_stats, s1.d_batch_stats)):
        assert relative_error(a, b) < 1e-5
        assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_on_a_cpu_mesh_does_not_donate_its_state(lpips_params):
    """loop.jit_step donates the state on accelerators only: on CPU, XLA would copy every
    donated Adam moment before writing it (BENCHMARKS.md). The lowered program then aliases no
    output to an input, and the state passed in is left unchanged."""
    _, sc, mesh, state, shardings, batch = tiny_setup(disc_start=1)
    step = T.jit_train_step(sc, mesh, shardings, lpips_params)
    text = step.lower(state, batch, lpips_params).as_text()
    assert "aliasing_output" not in text and "buffer_donor" not in text
    before = jax.device_get(state)
    new_state, _ = step(state, batch, lpips_params)
    assert_trees_close(jax.device_get(state), before, rtol=0, atol=0)
    assert int(new_state.step) == int(before.step) + 1


def test_checkpoint_restore_gives_identical_next_step(lpips_params, tmp_path):
    _, sc, mesh, state, shardings, batch = tiny_setup(disc_start=1)
    step = T.jit_train_step(sc, mesh, shardings, lpips_params)
    state, _ = step(state, batch, lpips_params)
    manager = workdir_lib.checkpoint_manager(str(tmp_path), max_to_keep=2, item_names=("state",))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    expected_state, expected = step(jax.tree.map(jnp.copy, state), batch, lpips_params)

    restored = manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(workdir_lib.abstract_like(state, shardings))))["state"]
    got_state, got = step(restored, batch, lpips_params)
    manager.close()
    for k in expected:
        assert float(got[k]) == float(expected[k]), k
    assert_trees_close(got_state, expected_state, rtol=0, atol=0)
