"""The quantizer family (models/quantizers.py): each kind against a direct numpy computation of
its formula, straight-through gradients for every kind, config validation, and real jitted
train steps (EMA + dead-code restart checked exactly; one smoke step for each other kind)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, shrink
from vqgan_jax.models import quantizers as Q
from vqgan_jax.models import registry
from vqgan_jax.models.vqgan import VQModel
from vqgan_jax.state import tokenizer as state1
from vqgan_jax.trainers import tokenizer as T

KEY = jax.random.key(0)


def _init(q, z):
    return nn.meta.unbox(q.init(KEY, z))


def _train_apply(q, variables, z, step=0, rng=1):
    """One training-mode call with the STATS collection mutable."""
    return q.apply(variables, z, True, jnp.int32(step), rngs={Q.RNG: jax.random.key(rng)},
                   mutable=[Q.STATS])


def _nearest(z, codebook):
    d = ((z[:, None, :].astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(-1)


# ----------------------------------------------------------------------------- EMA / restart

def test_ema_moves_codes_to_the_laplace_smoothed_average_of_their_vectors():
    decay, eps, k, dim = 0.9, 1e-3, 4, 2
    q = Q.EMAVQSpec(ema_decay=decay, ema_epsilon=eps).make(k, dim)
    codebook = np.array([[0, 0], [4, 0], [0, 4], [9, 9]], np.float32)   # code 3: never chosen
    z = np.array([[0.5, 0.1], [-0.3, 0.4], [3.5, 0.5], [4.4, -0.2], [4.1, 0.3], [0.2, 3.0]],
                 np.float32)
    variables = {"params": {"codebook": jnp.asarray(codebook)},
                 Q.STATS: {"cluster_size": jnp.ones(k), "embed_sum": jnp.asarray(codebook)}}
    (z_q, aux), new = _train_apply(q, variables, z)

    idx = _nearest(z, codebook)
    np.testing.assert_array_equal(aux["indices"], idx)
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    sums = np.zeros((k, dim))
    np.add.at(sums, idx, z.astype(np.float64))
    n = decay * 1.0 + (1 - decay) * counts                  # van den Oord et al. 2017, eq. 6-8
    m = decay * codebook + (1 - decay) * sums
    smoothed = (n + eps) / (n.sum() + k * eps) * n.sum()
    expected = m / smoothed[:, None]
    np.testing.assert_allclose(new[Q.STATS]["cluster_size"], n, rtol=1e-6)
    np.testing.assert_allclose(new[Q.STATS]["embed_sum"], m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux["codebook_update"], expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(aux["codebook_update_mask"]))
    # Each used code moved toward the mean of its vectors; the unused one stayed (almost) put.
    for c in range(3):
        mean = sums[c] / counts[c]
        assert np.linalg.norm(expected[c] - mean) < np.linalg.norm(codebook[c] - mean)
    np.testing.assert_allclose(expected[3], codebook[3], rtol=2e-3)
    # The codebook learns by EMA only: no codebook loss, no gradient on it.
    assert float(aux["codebook_loss"]) == 0.0
    grad = jax.grad(lambda p: _train_apply(q, dict(variables, params=p), z)[0][1]["vq_loss"])(
        variables["params"])
    np.testing.assert_array_equal(grad["codebook"], 0.0)
    # Inference reads the parameter only.
    z_eval, aux_eval = q.apply({"params": variables["params"]}, z)
    np.testing.assert_array_equal(aux_eval["indices"], idx)
    assert "codebook_update" not in aux_eval


@pytest.mark.parametrize("kind", ["vq", "ema_vq"])
def test_a_code_unused_for_n_steps_is_reseeded_from_the_batch(kind):
    k, dim = 4, 3
    q = Q.SPECS[kind](restart_unused_steps=2).make(k, dim)
    z = jax.random.normal(jax.random.key(3), (2, 5, dim))
    variables = _init(q, z)
    codebook = np.array(variables["params"]["codebook"])
    codebook[2] = 100.0                                     # far from every z_e: never chosen
    variables["params"]["codebook"] = jnp.asarray(codebook)
    if kind == "ema_vq":
        variables[Q.STATS]["embed_sum"] = jnp.asarray(codebook)
    flat = np.asarray(z).reshape(-1, dim)
    used = set(_nearest(flat, codebook).tolist())
    assert 2 not in used

    (_, aux1), new = _train_apply(q, variables, z, step=0)   # first unused step: counted only
    stats1 = new[Q.STATS]
    assert int(stats1["unused_steps"][2]) == 1 and float(aux1["restarted_codes"]) == 0.0
    assert bool(aux1["codebook_update_mask"][2]) == (kind == "ema_vq")  # EMA writes every row
    if kind == "ema_vq":  # not re-seeded: still the EMA of the 100s
        np.testing.assert_allclose(aux1["codebook_update"][2], 100.0, rtol=1e-3)

    (_, aux2), new = _train_apply(q, dict(variables, **new), z, step=1, rng=5)
    mask = np.asarray(aux2["codebook_update_mask"])
    assert mask[2] and float(aux2["restarted_codes"]) == k - len(used)
    if kind == "vq":  # only the dead codes are written
        np.testing.assert_array_equal(mask, [c not in used for c in range(k)])
    reseeded = np.asarray(aux2["codebook_update"])[2]
    assert np.min(np.abs(flat - reseeded).max(-1)) == 0.0     # exactly one of this batch's z_e
    assert int(new[Q.STATS]["unused_steps"][2]) == 0
    if kind == "ema_vq":  # its statistics restart as one vector's worth
        assert float(new[Q.STATS]["cluster_size"][2]) == 1.0
        np.testing.assert_array_equal(new[Q.STATS]["embed_sum"][2], reseeded)


# ----------------------------------------------------------------------------- FSQ / LFQ

def fsq_reference(z, levels):
    """FSQ as printed in Mentzer et al. 2023, appendix A.1 (``bound`` then ``quantize``),
    in float64 NumPy: eps = 1e-3, half_l = (L - 1)(1 - eps) / 2, shift = tan(offset / half_l)."""
    levels = np.asarray(levels, np.float64)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = np.where(levels % 2 == 1, 0.0, 0.5)
    bounded = np.tanh(np.asarray(z, np.float64) + np.tan(offset / half_l)) * half_l - offset
    return bounded, np.round(bounded) / (levels // 2)


def test_fsq_matches_the_papers_reference_code():
    levels = (2, 3, 4, 5, 8)
    q = Q.FSQSpec(levels).make(math.prod(levels), len(levels))
    z = 2.0 * jax.random.normal(jax.random.key(3), (4096, len(levels)))
    z_q, aux = q.apply({}, z)
    bounded, expected = fsq_reference(z, levels)
    # float32 and float64 may round differently only where z_b is within float32 error of a
    # half-integer; leave those out.
    clear = np.abs(bounded - np.floor(bounded) - 0.5) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_allclose(np.asarray(z_q)[clear], expected[clear], atol=1e-6)
    # Two levels: the lower one for z < -tan(1 / 0.999) = -1.5601, about 5.9% of N(0, 1), and
    # a mean straight-through slope of E[half_l (1 - tanh^2(z + shift))] = 0.147.
    z2 = jax.random.normal(jax.random.key(4), (200_000, 1))
    q2 = Q.FSQSpec((2,)).make(2, 1)
    lower = float(jnp.mean(q2.apply({}, z2)[0] == -1.0))
    p = 0.5 * math.erfc(math.tan(1 / 0.999) / math.sqrt(2))
    assert abs(p - 0.0594) < 1e-3 and abs(lower - p) < 5 * math.sqrt(p * (1 - p) / 200_000)
    slope = jax.grad(lambda z: jnp.sum(q2.apply({}, z)[0]))(z2)
    grid = np.linspace(-10, 10, 200_001)
    density = np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi)
    mean_slope = np.sum(0.4995 * (1 - np.tanh(grid + math.tan(1 / 0.999)) ** 2) * density) * 1e-4
    assert abs(mean_slope - 0.147) < 1e-3
    np.testing.assert_allclose(float(jnp.mean(slope)), mean_slope, rtol=2e-2)


def test_fsq_indices_stay_on_the_grid_for_many_levels_and_bad_levels_are_rejected():
    levels = (1500, 2)                    # 1500 levels: the old (1 + 1e-3) bound left the grid
    q = Q.FSQSpec(levels).make(3000, 2)
    z = 50.0 * jax.random.normal(jax.random.key(5), (8192, 2))
    z_q, aux = q.apply({}, z)
    assert int(aux["indices"].min()) >= 0 and int(aux["indices"].max()) < 3000
    assert float(jnp.abs(z_q).max()) <= 1.0
    assert int(aux["indices"].max()) > 2900 and int(aux["indices"].min()) < 100   # both ends
    with pytest.raises(ValueError, match=r"fsq_levels=\(1, 4\): every level must be >= 2"):
        Q.FSQSpec((1, 4)).make(4, 2)
    with pytest.raises(ValueError, match=r"product .* < 2\*\*31"):
        Q.FSQSpec((2 ** 16, 2 ** 16)).make(2 ** 32, 2)

def test_fsq_codebook_is_the_level_grid_and_indices_round_trip():
    levels = (3, 4, 5, 2)
    q = Q.FSQSpec(levels).make(120, 4)
    assert q.n_codes == math.prod(levels) == 120
    z = 3.0 * jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    variables = q.init(KEY, z)
    assert not variables  # no parameters, no statistics
    z_q, aux = q.apply(variables, z)
    # Every channel on its grid (j - L//2) / (L//2), j in [0, L).
    for i, n_levels in enumerate(levels):
        grid = (np.arange(n_levels) - n_levels // 2) / (n_levels // 2)
        values = np.asarray(z_q[..., i]).reshape(-1)
        assert np.abs(values[:, None] - grid[None]).min(-1).max() < 1e-6
    assert set(np.unique(np.asarray(z_q[..., 0]))) == {-1.0, 0.0, 1.0}  # big z_e reach all levels
    # indices -> codes -> indices, over the whole codebook; codes all distinct.
    all_indices = jnp.arange(120)
    codes = q.apply(variables, all_indices, method=Q.FSQuantizer.lookup)
    assert len({tuple(c) for c in np.asarray(codes).tolist()}) == 120
    np.testing.assert_array_equal(q.apply(variables, codes, method=Q.FSQuantizer.codes_to_indices),
                                  all_indices)
    np.testing.assert_allclose(q.apply(variables, aux["indices"], method="lookup"), z_q, atol=1e-6)
    assert float(aux["vq_loss"]) == 0.0 and aux["indices"].dtype == jnp.int32
    with pytest.raises(ValueError, match=r"config.model.n_embed=64.*set config.model.n_embed=120"):
        Q.FSQSpec(levels).make(64, 4)
    with pytest.raises(ValueError, match=r"config.model.embed_dim=3 must equal"):
        Q.FSQSpec(levels).make(120, 3)


def test_lfq_entropy_terms_equal_a_direct_computation():
    dim, temperature, weight, gamma = 3, 0.7, 0.3, 1.5
    q = Q.LFQSpec(entropy_weight=weight, entropy_temperature=temperature,
                  entropy_gamma=gamma).make(2 ** dim, dim, beta=0.25)
    z = 0.8 * jax.random.normal(jax.random.key(2), (2, 3, 4, dim))
    z_q, aux = q.apply({}, z)
    zf = np.asarray(z, np.float64).reshape(-1, dim)
    codes = np.array([[1.0 if (c >> (dim - 1 - i)) & 1 else -1.0 for i in range(dim)]
                      for c in range(2 ** dim)])
    logits = -((zf[:, None, :] - codes[None]) ** 2).sum(-1) / temperature   # MAGVIT-v2 eq. 5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    entropy = lambda p: -(p * np.log(p)).sum(-1)
    per_sample, batch = entropy(probs).mean(), entropy(probs.mean(0))
    np.testing.assert_allclose(aux["per_sample_entropy"], per_sample, rtol=1e-5)
    np.testing.assert_allclose(aux["batch_entropy"], batch, rtol=1e-5)
    np.testing.assert_allclose(aux["entropy_loss"], weight * (per_sample - gamma * batch),
                               rtol=1e-4, atol=1e-6)
    # Codes are the signs; the index is the bits read most significant first.
    np.testing.assert_array_equal(np.asarray(z_q).reshape(-1, dim), np.where(zf > 0, 1.0, -1.0))
    np.testing.assert_array_equal(codes[np.asarray(aux["indices"]).reshape(-1)],
                                  np.where(zf > 0, 1.0, -1.0))
    np.testing.assert_array_equal(q.apply({}, aux["indices"], method="lookup"), z_q)
    np.testing.assert_allclose(aux["commitment_loss"], 0.25 * ((zf - np.sign(zf)) ** 2).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(aux["vq_loss"], aux["commitment_loss"] + aux["entropy_loss"],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- Gumbel

def test_gumbel_forward_is_a_hard_one_hot_and_its_gradient_the_relaxed_samples():
    k, dim = 6, 3
    q = Q.GumbelSpec(gumbel_tau_start=2.0, gumbel_tau_end=0.5,
                     gumbel_anneal_steps=100).make(k, dim)
    z = jax.random.normal(jax.random.key(4), (2, 4, dim))
    variables = _init(q, z)
    params = variables["params"]
    w = jax.random.normal(jax.random.key(5), z.shape)
    step, rng = 50, jax.random.key(9)

    def loss(z, params):
        (z_q, aux), _ = q.apply({"params": params}, z, True, jnp.int32(step), rngs={Q.RNG: rng},
                                mutable=[Q.STATS])
        return jnp.sum(z_q * w), (z_q, aux)

    (_, (z_q, aux)), (g_z, g_params) = jax.value_and_grad(loss, (0, 1), has_aux=True)(z, params)
    np.testing.assert_allclose(aux["temperature"], 1.25, rtol=1e-6)   # cosine midpoint
    # The noise the module drew (its first draw from the stream, at the same scope).
    noise_key = q.apply({"params": params}, method=lambda m: m.make_rng(Q.RNG), rngs={Q.RNG: rng})
    logits_fn = lambda z, p: q.apply({"params": p}, z, method=lambda m, z: m.proj(z))
    g = jax.random.gumbel(noise_key, (2, 4, k))
    np.testing.assert_array_equal(aux["indices"], jnp.argmax(logits_fn(z, params) + g, -1))
    np.testing.assert_allclose(z_q, np.asarray(params["codebook"])[np.asarray(aux["indices"])],
                               atol=1e-6)

    def relaxed(z, p):  # softmax((l + g) / tau) @ codebook
        y = jax.nn.softmax((logits_fn(z, p) + g) / 1.25, axis=-1)
        return jnp.sum(jnp.einsum("...k,kd->...d", y, p["codebook"],
                                  precision=jax.lax.Precision.HIGHEST) * w)

    e_z, e_params = jax.grad(relaxed, (0, 1))(z, params)
    np.testing.assert_allclose(g_z, e_z, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_z).max()) > 0
    np.testing.assert_allclose(g_params["proj"]["kernel"], e_params["proj"]["kernel"],
                               rtol=1e-4, atol=1e-6)
    # Inference is deterministic: the argmax of the logits, no rng.
    z_eval, aux_eval = q.apply({"params": params}, z)
    np.testing.assert_array_equal(aux_eval["indices"], jnp.argmax(logits_fn(z, params), -1))
    np.testing.assert_array_equal(q.apply({"params": params}, aux_eval["indices"],
                                          method="lookup"), z_eval)
    # KL(softmax(l) || uniform), taming's form.
    p = jax.nn.softmax(logits_fn(z, params), -1)
    np.testing.assert_allclose(aux["kl_loss"], 1e-8 * np.mean(np.sum(p * np.log(p * k), -1)),
                               rtol=1e-4)


# ----------------------------------------------------------------------------- all kinds

KINDS = {  # kind: (n_embed, embed_dim, knobs)
    "vq": (8, 3, dict(restart_unused_steps=1, entropy_weight=0.1)),
    "ema_vq": (8, 3, dict(restart_unused_steps=1, entropy_weight=0.1)),
    "gumbel": (8, 3, {}),
    "fsq": (24, 3, dict(fsq_levels=(4, 3, 2))),
    "lfq": (8, 3, dict(entropy_weight=0.1)),
}


@pytest.mark.parametrize("kind", Q.KINDS)
def test_gradients_flow_straight_through_and_aux_has_the_fixed_keys(kind):
    n_embed, dim, knobs = KINDS[kind]
    q = Q.SPECS[kind](**knobs).make(n_embed, dim)
    assert q.n_codes == n_embed
    z = jax.random.normal(jax.random.key(6), (2, 5, dim))
    w = jax.random.normal(jax.random.key(7), z.shape)
    variables = _init(q, z)

    def f(z):
        (z_q, aux), _ = _train_apply(q, variables, z)
        return jnp.sum(z_q * w), aux

    grad, aux = jax.grad(f, has_aux=True)(z)
    if kind == "fsq":  # the derivative of the paper's bound (fsq_reference), by hand
        levels = np.array([4, 3, 2], np.float64)
        half_l = (levels - 1) * 0.999 / 2
        shift = np.tan(np.where(levels % 2 == 0, 0.5, 0.0) / half_l)
        slope = half_l * (1 - np.tanh(np.asarray(z) + shift) ** 2) / (levels // 2)
        expected = np.asarray(w) * slope
    elif kind == "gumbel":  # the relaxed sample's gradient (exact form tested above)
        assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0
        expected = None
    else:
        expected = w
    if expected is not None:
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    for key in ("indices", "vq_loss", "codebook_loss", "commitment_loss", "entropy_loss",
                "kl_loss", "perplexity", "codebook_usage"):
        assert key in aux, key
    assert aux["indices"].dtype == jnp.int32 and aux["indices"].shape == z.shape[:-1]
    assert aux["vq_loss"].dtype == jnp.float32 and aux["vq_loss"].shape == ()
    np.testing.assert_allclose(aux["vq_loss"], sum(aux[k] for k in (
        "codebook_loss", "commitment_loss", "entropy_loss", "kl_loss")), rtol=1e-6)
    # Inference with the parameters only; lookup(indices) gives z_q back.
    z_q, aux = q.apply({"params": variables["params"]} if "params" in variables else {}, z)
    back = q.apply({"params": variables["params"]} if "params" in variables else {},
                   aux["indices"], method="lookup")
    np.testing.assert_allclose(back, z_q, atol=1e-6)


def test_unknown_kind_and_inconsistent_sizes_fail_naming_the_field():
    with pytest.raises(ValueError, match=r"config.quantizer.kind='vqq'.*\['vq', 'ema_vq'"):
        Q.quantizer_spec(dict(kind="vqq"))
    with pytest.raises(ValueError, match="ema_dacay"):
        Q.quantizer_spec(dict(kind="ema_vq", ema_dacay=0.9))
    config = load_config("demo")
    config.quantizer.update(kind="vqq", restart_unused_steps=0)  # restarts are for vq, ema_vq
    with pytest.raises(ValueError, match=r"config.quantizer.kind='vqq'.*'fsq', 'lfq'"):
        T.validate_config(config, num_devices=1)
    config.quantizer.kind = "lfq"
    config.model.l2_normalize_codes = False
    with pytest.raises(ValueError, match=r"config.model.n_embed=1024.*2 \*\* embed_dim = 256.*"
                                         r"set config.model.n_embed=256"):
        T.validate_config(config, num_devices=1)
    config.model.n_embed = 256
    T.validate_config(config, num_devices=1)
    config.quantizer.kind = "fsq"
    config.quantizer.fsq_levels = (8, 5, 5, 5)
    with pytest.raises(ValueError, match=r"config.model.embed_dim=8 must equal len\("):
        T.validate_config(config, num_devices=1)
    config.model.embed_dim = 4
    with pytest.raises(ValueError, match=r"prod\(config.quantizer.fsq_levels\) = 1000"):
        T.validate_config(config, num_devices=1)
    config.quantizer.kind = "gumbel"
    config.model.l2_normalize_codes = True
    with pytest.raises(ValueError, match="config.model.l2_normalize_codes"):
        T.validate_config(config, num_devices=1)
    config = load_config("demo")
    config.quantizer.update(kind="fsq", restart_unused_steps=10)
    config.model.l2_normalize_codes = False
    with pytest.raises(ValueError, match="config.quantizer.restart_unused_steps"):
        T.validate_config(config, num_devices=1)


def test_quantizer_spec_reads_old_and_json_configs_into_hashable_specs():
    assert Q.quantizer_spec(None) == Q.VQSpec()  # a config from before config.quantizer
    spec = Q.quantizer_spec({"kind": "fsq", "fsq_levels": [4, 3], "ema_decay": 0.9})  # JSON
    assert spec == Q.FSQSpec((4, 3)) and hash(spec) == hash(Q.FSQSpec((4, 3)))
    assert not hasattr(spec.make(12, 2), "beta")  # no unused fields on gumbel, fsq
    with pytest.raises(ValueError, match="config.quantizer.ema_decay=1.0"):
        Q.EMAVQSpec(ema_decay=1.0)


def test_plain_vq_parameters_are_unchanged_by_the_quantizer_field():
    config = load_config("imagenet_f16")
    shapes = lambda model: jax.tree.map(jnp.shape, nn.meta.unbox(jax.eval_shape(
        lambda: model.init(KEY, jnp.zeros((1, 256, 256, 3))))))
    old = shapes(VQModel(**config.model.to_dict()))
    new = shapes(registry.build_models(config)[0])
    assert old == new and set(new) == {"params"}
    assert set(new["params"]["quantize"]) == {"codebook"}


# ----------------------------------------------------------------------------- train steps

def _tiny_state(kind, **knobs):
    """A stage-1 StepConfig, TrainState and batch at 8x8 pixels, f1, one level: the smallest
    graph the train step has (its compile time dominates these tests). Built eagerly, so the
    per-op executables are shared by every kind."""
    config = shrink(load_config("demo"))
    config.image_size = 8
    config.model.update(ch=8, ch_mult=(1,), attn_resolutions=(), z_channels=4,
                        l2_normalize_codes=False, norm_groups=4, embed_dim=3)
    config.disc.update(ndf=4, n_layers=1)
    config.loss.update(disc_start=0, perceptual_weight=0.0)
    config.quantizer.restart_unused_steps = 0  # the demo's; knobs set it where a kind uses it
    config.quantizer.update(kind=kind, **knobs)
    config.model.n_embed = {"fsq": 24, "lfq": 8}.get(kind, 32)
    T.validate_config(config, num_devices=1)
    sc = state1.build_step_config(config)
    state = state1.init_state(KEY, sc, image_size=8)
    batch = {"image": jax.random.uniform(jax.random.key(7), (2, 8, 8, 3), minval=-1, maxval=1)}
    return sc, state, batch


def test_two_ema_train_steps_follow_the_ema_and_revive_dead_codes():
    decay, eps = 0.9, 1e-5
    sc, state, batch = _tiny_state("ema_vq", ema_decay=decay, ema_epsilon=eps,
                                   restart_unused_steps=1)
    step = jax.jit(functools.partial(T.train_step, sc=sc), donate_argnums=0)
    assert set(state.quantizer_stats["quantize"]) == {"cluster_size", "embed_sum", "unused_steps"}
    before = jax.device_get(state)
    _, aux = sc.vq.apply({"params": before.g_params}, batch["image"], method=VQModel.encode)
    z = np.asarray(aux["z_e"], np.float64).reshape(-1, 3)
    idx = np.asarray(aux["indices"]).reshape(-1)
    state, metrics = step(state, batch, None)
    after = jax.device_get(state)
    assert float(metrics["nonfinite"]) == 0.0

    k = 32
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    sums = np.zeros((k, 3))
    np.add.at(sums, idx, z)
    n = decay + (1 - decay) * counts
    m = decay * np.asarray(before.g_params["quantize"]["codebook"], np.float64) + (1 - decay) * sums
    smoothed = (n + eps) / (n.sum() + k * eps) * n.sum()
    codebook = np.asarray(after.g_params["quantize"]["codebook"])
    used, dead = counts > 0, counts == 0
    assert dead.any() and used.any() and float(metrics["restarted_codes"]) == dead.sum()
    np.testing.assert_allclose(codebook[used], (m / smoothed[:, None])[used], rtol=1e-4, atol=1e-6)
    stats = after.quantizer_stats["quantize"]
    np.testing.assert_allclose(stats["cluster_size"][used], n[used], rtol=1e-6)
    # Dead codes (unused for 1 step) now hold encoder outputs of this batch.
    for row in codebook[dead]:
        assert np.abs(z - row).max(-1).min() < 1e-5
    np.testing.assert_array_equal(stats["cluster_size"][dead], 1.0)
    np.testing.assert_array_equal(stats["unused_steps"], 0)
    # The Adam moments of the codebook stay zero (its gradient is zero).
    assert float(metrics["codebook_loss"]) == 0.0

    state, metrics = step(state, batch, None)
    assert int(state.step) == 2 and float(metrics["nonfinite"]) == 0.0
    assert not np.array_equal(jax.device_get(state.g_params["quantize"]["codebook"]), codebook)
    assert float(metrics["codebook_usage"]) > float(used.mean())  # revived codes get picked


@pytest.mark.parametrize("kind, knobs", [("vq", dict(restart_unused_steps=1)),
                                         ("gumbel", dict(gumbel_anneal_steps=10)),
                                         ("fsq", dict(fsq_levels=(4, 3, 2))),
                                         ("lfq", dict(entropy_weight=0.1))])
def test_one_train_step_per_kind(kind, knobs):
    """Eager (op by op): the ops the kinds share compile once for all of them."""
    sc, state, batch = _tiny_state(kind, **knobs)
    state, metrics = T.train_step(state, batch, None, sc)
    assert int(state.step) == 1 and float(metrics["nonfinite"]) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for key in ("codebook_loss", "commitment_loss", "entropy_loss", "kl_loss", "vq_loss"):
        assert key in metrics, key
    if kind == "gumbel":
        assert float(metrics["kl_loss"]) != 0.0 and 0.0 < float(metrics["temperature"]) < 0.9 + 1e-6
    if kind == "lfq":
        assert float(metrics["entropy_loss"]) != 0.0


def test_fresh_quantizer_stats_for_given_parameters():
    """What interop writes for a converted codebook: EMA sums start at that codebook."""
    sc, state, _ = _tiny_state("ema_vq", restart_unused_steps=3)
    codebook = state.g_params["quantize"]["codebook"] + 1.0
    g_params = dict(state.g_params, quantize={"codebook": codebook})
    stats = state1.init_quantizer_stats(sc.vq, g_params)["quantize"]
    np.testing.assert_array_equal(stats["embed_sum"], g_params["quantize"]["codebook"])
    np.testing.assert_array_equal(stats["cluster_size"], 1.0)
    np.testing.assert_array_equal(stats["unused_steps"], 0)
    assert state1.init_quantizer_stats(_tiny_state("fsq", fsq_levels=(4, 3, 2))[0].vq, {}) == {}
