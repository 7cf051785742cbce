"""MaskGIT's parallel decoding and the guidance schedules, on tiny random models against the
cosine schedule, brute-force greedy decoding and hand-computed numbers.

Compiles (the file's cost): three MaskGIT samplers (T=8 batch 3; greedy T=N batch 1, plain and
guided), one AR sampler and two forward passes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.gpt import GPT
from vqgan_jax.models.maskgit import MaskGIT
from vqgan_jax.samplers import autoregressive, maskgit
from vqgan_jax.samplers.guidance import GuidanceSchedule, guide

V, N = 16, 16  # 16 codes, a 4x4 grid
MODEL = MaskGIT(vocab_size=V, seq_len=N, num_classes=2, n_layer=1, n_head=2, n_embd=32)
MASK = MODEL.mask_token
GREEDY = dict(model=MODEL, num_steps=N, top_k=1, choice_temperature=0.0, return_history=True)


def random_params(init, *args, seed=0, std=0.1):
    """Random parameters of init's shapes without compiling init: LayerNorm scales 1, biases 0,
    the rest N(0, std^2)."""
    shapes = jax.eval_shape(init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        s = getattr(s, "value", s)  # LogicallyPartitioned boxes
        if name.endswith("'scale']"):
            return jnp.ones(s.shape, s.dtype)
        if name.endswith("'bias']"):  # no bias: the codes depend on the context, not one code
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

    is_box = lambda x: hasattr(x, "value") and hasattr(x, "names")
    return jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=is_box)


@pytest.fixture(scope="module")
def params():
    return random_params(MODEL.init, jnp.zeros((1, N), jnp.int32), jnp.zeros((1,), jnp.int32),
                         std=0.3)


@pytest.fixture(scope="module")
def forward(params):
    fn = jax.jit(lambda codes, cond: MODEL.apply({"params": params}, codes, cond))
    return lambda codes, cond: np.asarray(fn(jnp.asarray(codes), jnp.asarray(cond)))


def test_cosine_schedule_by_hand_and_its_bounds():
    # floor(16 cos(pi/2 (t+1)/8)) = floor(15.69, 14.78, 13.30, 11.31, 8.89, 6.12, 3.12), then 0.
    assert [maskgit.masked_after_step(t, 8, 16) for t in range(8)] == [15, 14, 13, 11, 8, 6, 3, 0]
    # 256 codes in 12 steps (the paper's ImageNet 256 setting): floor(256 cos(pi/24)) = 253.
    assert maskgit.masked_after_step(0, 12, 256) == 253
    for n in range(1, 21):
        for steps in range(1, n + 1):
            counts = [n] + [maskgit.masked_after_step(t, steps, n) for t in range(steps)]
            assert counts[-1] == 0 and all(c >= 1 for c in counts[1:-1]), (n, steps)
            assert all(a > b for a, b in zip(counts, counts[1:])), (n, steps)
            for t in range(steps - 1):
                cosine = math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))
                assert counts[t + 1] <= max(cosine, 1)
    assert [maskgit.masked_after_step(t, 4, 4) for t in range(4)] == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="num_steps=17"):
        maskgit.masked_after_step(0, 17, 16)
    with pytest.raises(ValueError, match="t=8"):
        maskgit.masked_after_step(8, 8, 16)


def test_masks_follow_the_schedule_kept_codes_never_change_and_seeds_reproduce(params):
    cond = MODEL.class_tokens(jnp.array([0, 1, 1]))
    run = lambda seed, choice=4.5: maskgit.sample(params, cond, jax.random.key(seed),
                                                  model=MODEL, num_steps=8,
                                                  choice_temperature=choice, return_history=True)
    codes, history = (np.asarray(x) for x in run(0))
    assert codes.shape == (3, N) and codes.dtype == np.int32 and history.shape == (8, 3, N)
    assert ((0 <= codes) & (codes < V)).all()
    np.testing.assert_array_equal(history[-1], codes)
    schedule = [maskgit.masked_after_step(t, 8, N) for t in range(8)]
    np.testing.assert_array_equal((history == MASK).sum(-1), np.repeat([schedule], 3, 0).T)
    for t in range(1, 8):  # a code kept at step t-1 is the same at step t
        kept = history[t - 1] != MASK
        np.testing.assert_array_equal(history[t][kept], history[t - 1][kept])
    again, _ = run(0)
    np.testing.assert_array_equal(np.asarray(again), codes)
    other, _ = run(1)
    assert (np.asarray(other) != codes).any()
    no_noise, _ = run(0, choice=0.0)  # the Gumbel noise on the confidences changes the order
    assert (np.asarray(no_noise) != codes).any()


def greedy_reference(forward, cond_token):
    """Brute force: each step fill the masked position whose most probable code is the most
    probable, with that code (MaskGIT with T = N, top_k = 1, choice_temperature = 0)."""
    codes = np.full((1, N), MASK, np.int32)
    trajectory = []
    for _ in range(N):
        logits = forward(codes, np.array([cond_token], np.int32))[0].astype(np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        best = log_probs.max(-1)
        masked = np.flatnonzero(codes[0] == MASK)
        order = masked[np.argsort(-best[masked])]
        if len(order) > 1:  # a clear winner: float32 rounding (~1e-6 here) cannot reorder it
            assert best[order[0]] - best[order[1]] > 1e-4
        codes = codes.copy()
        codes[0, order[0]] = logits[order[0]].argmax()
        trajectory.append(codes[0])
    return np.stack(trajectory)


def test_one_code_a_step_is_the_most_confident(params, forward):
    for cond_token in (int(MODEL.class_tokens(0)), MODEL.null_token):
        codes, history = maskgit.sample(params, jnp.array([cond_token]), jax.random.key(2),
                                        **GREEDY)
        history = np.asarray(history)[:, 0]
        assert ((history != MASK).sum(-1) == np.arange(1, N + 1)).all()
        np.testing.assert_array_equal(history, greedy_reference(forward, cond_token))
        np.testing.assert_array_equal(np.asarray(codes)[0], history[-1])


def test_guided_sampler_at_scale_1_and_0(params):
    cond = MODEL.class_tokens(jnp.array([1]))
    null = jnp.array([MODEL.null_token])
    rng = jax.random.key(3)
    plain = lambda c: np.asarray(maskgit.sample(params, c, rng, **GREEDY)[0])
    guided = lambda s: np.asarray(maskgit.sample(params, cond, rng, guidance=GuidanceSchedule(
        scale=s), null_tokens=null, **GREEDY)[0])
    np.testing.assert_array_equal(guided(1.0), plain(cond))
    np.testing.assert_array_equal(guided(0.0), plain(null))
    assert (guided(4.0) != plain(cond)).any()


def test_guide_and_schedule_values_by_hand():
    cond, uncond = np.array([[1.0, 2.0]]), np.array([[0.5, -1.0]])
    logits = jnp.asarray(np.concatenate([cond, uncond]), jnp.float32)
    np.testing.assert_array_equal(guide(logits, 0.0), uncond)
    np.testing.assert_array_equal(guide(logits, 1.0), cond)
    np.testing.assert_allclose(guide(logits, 2.0), [[1.5, 5.0]], rtol=1e-6)
    assert guide(logits, None) is logits

    eps = 4 * np.finfo(np.float32).eps
    cases = [  # (schedule, progress, value): s = 3
        (GuidanceSchedule("constant", 3.0), 0.37, 3.0),
        (GuidanceSchedule("linear", 3.0), 0.0, 1.0),
        (GuidanceSchedule("linear", 3.0), 0.25, 1.5),
        (GuidanceSchedule("linear", 3.0), 1.0, 3.0),
        (GuidanceSchedule("power_cosine", 3.0), 0.0, 1.0),
        (GuidanceSchedule("power_cosine", 3.0), 0.5, 2.0),           # 1 + 2 (1 - cos(pi/2)) / 2
        (GuidanceSchedule("power_cosine", 3.0, power=2.0), 0.5, 2.0 - math.sqrt(0.5)),  # cos(pi/4)
        (GuidanceSchedule("power_cosine", 3.0, power=2.0), 1.0, 3.0),
        (GuidanceSchedule("interval", 3.0, interval=(0.25, 0.75)), 0.1, 1.0),
        (GuidanceSchedule("interval", 3.0, interval=(0.25, 0.75)), 0.25, 3.0),
        (GuidanceSchedule("interval", 3.0, interval=(0.25, 0.75)), 0.75, 3.0),
        (GuidanceSchedule("interval", 3.0, interval=(0.25, 0.75)), 0.9, 1.0),
    ]
    for schedule, progress, value in cases:
        got = schedule.scale_at(jnp.float32(progress))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, value, rtol=eps, err_msg=str(schedule))
    # Traceable, with the scale a traced leaf; every schedule is 1 at scale 1.
    traced = jax.jit(lambda g, p: g.scale_at(p))
    for kind in ("linear", "power_cosine", "interval"):
        np.testing.assert_allclose(traced(GuidanceSchedule(kind, 1.0), jnp.float32(0.6)), 1.0)
    assert hash(GuidanceSchedule("linear", 2.0)) == hash(GuidanceSchedule("linear", 2.0))
    assert GuidanceSchedule(interval=[0, 1]).interval == (0.0, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="cosine"), "kind='cosine'.*constant, linear, power_cosine, interval"),
    (dict(power=0.0), "power=0.0"),
    (dict(interval=(0.5, 0.25)), r"interval=\(0.5, 0.25\)"),
    (dict(interval=(-0.1, 1.0)), "interval="),
    (dict(interval=(0.0,)), "interval="),
])
def test_bad_schedule_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidanceSchedule(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=17), "num_steps=17"),
    (dict(num_steps=0), "num_steps=0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(choice_temperature=-1.0), "choice_temperature=-1.0"),
    (dict(null_tokens=jnp.array([MODEL.null_token] * 2)), "null_tokens has shape"),
    (dict(cond_tokens=jnp.zeros((1, 1), jnp.int32)), "cond_tokens has shape"),
    (dict(guidance=2.0), "guidance=2.0"),
])
def test_bad_sampler_arguments_fail_before_compiling(params, monkeypatch, kwargs, message):
    monkeypatch.setattr(maskgit, "_sample", None)  # any call to the jitted program would fail
    kwargs = dict(dict(cond_tokens=jnp.array([MODEL.null_token])), **kwargs)
    with pytest.raises(ValueError, match=message):
        maskgit.sample(params, kwargs.pop("cond_tokens"), jax.random.key(0), model=MODEL,
                       **kwargs)


# ----------------------------------------------------------------- AR sampler with a schedule

GPT_TINY = GPT(vocab_size=V, block_size=N, n_layer=1, n_head=2, n_embd=32, n_cond_tokens=3)


def test_autoregressive_bad_schedule_fails_while_tracing():
    params = jax.eval_shape(GPT_TINY.init, jax.random.key(0), jnp.zeros((1, N), jnp.int32))
    for kwargs, message in ((dict(guidance_schedule="cosine"), "kind='cosine'"),
                            (dict(guidance_power=-1.0), "power=-1.0"),
                            (dict(guidance_interval=(0.9, 0.1)), "interval=")):
        with pytest.raises(ValueError, match=message):  # before the model is ever applied
            autoregressive.sample(params["params"], jnp.array([[V]]), jax.random.key(0),
                                  gpt=GPT_TINY, num_codes=N, **kwargs)


def test_autoregressive_linear_guidance_rises_from_1_to_s(monkeypatch):
    """Greedy AR decoding with guidance_schedule="linear" at s = 4: code n is guided at
    s_n = 1 + 3 n / 15 (recorded from inside the sampler) and is the argmax of u + s_n (c - u)
    (brute force by full recomputation)."""
    params = random_params(GPT_TINY.init, jnp.zeros((1, N), jnp.int32), seed=1, std=0.3)
    forward = jax.jit(lambda t: GPT_TINY.apply({"params": params}, t)[0])
    s, schedule = 4.0, GuidanceSchedule("linear", 4.0)
    assert float(schedule.scale_at(0 / (N - 1))) == 1.0 and float(schedule.scale_at(1.0)) == s

    def reference(scale_of):
        codes = np.zeros((2, 0), np.int32)
        for n in range(N):
            tokens = np.concatenate([np.concatenate([[[V], [V + 1]], [[V + 2], [V + 2]]]),
                                     np.concatenate([codes, codes])], 1)
            logits = np.asarray(forward(jnp.asarray(np.pad(tokens, ((0, 0), (0, N - n - 1))))))
            cond, uncond = logits[:2, n], logits[2:, n]
            guided = uncond + np.float32(scale_of(n)) * (cond - uncond)
            top2 = np.sort(guided, -1)[:, -2:]
            assert (top2[:, 1] - top2[:, 0] > 1e-4).all()  # a clear argmax
            codes = np.concatenate([codes, guided.argmax(-1)[:, None].astype(np.int32)], 1)
        return codes

    linear = reference(lambda n: schedule.scale_at(n / (N - 1)))
    scales = []  # the scale of every guide() call, in order (code 0 first)
    spy = lambda logits, scale: (jax.debug.callback(lambda x: scales.append(float(x)), scale,
                                                    ordered=True), guide(logits, scale))[1]
    # Traced anew with the spy: no other test samples GPT_TINY with the linear schedule (had one
    # compiled it already, the spy would record nothing and the check below would fail).
    monkeypatch.setattr(autoregressive, "guide", spy)
    codes = autoregressive.sample(params, jnp.array([[V], [V + 1]]), jax.random.key(0),
                                  gpt=GPT_TINY, num_codes=N, top_k=1,
                                  null_prefix=jnp.array([[V + 2], [V + 2]]), guidance_scale=s,
                                  guidance_schedule="linear")
    np.testing.assert_array_equal(np.asarray(codes), linear)
    expected = 1.0 + (s - 1.0) * (np.arange(N, dtype=np.float32) / np.float32(N - 1))
    np.testing.assert_allclose(scales, expected, rtol=4 * np.finfo(np.float32).eps)
    assert scales[0] == 1.0 and scales[-1] == s
    # The schedule matters here: constant scales 1 and s draw other codes.
    assert (reference(lambda n: 1.0) != linear).any() and (reference(lambda n: s) != linear).any()
