"""The stage-2 GPT and its samplers against direct recomputation and brute-force references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.gpt import GPT
from vqgan_jax.samplers import autoregressive

V, GRID, P = 16, (4, 4), 1          # 16 codes, a 4x4 grid, one prefix token
N = GRID[0] * GRID[1]
GPT_TINY = GPT(vocab_size=V, block_size=P + N - 1, n_layer=2, n_head=2, n_embd=16,
               n_cond_tokens=3)     # tokens 16 (class 0), 17 (class 1), 18 (null)
PREFIX = jnp.array([[V], [V + 1]])  # one shape and one set of static arguments for most
KW = dict(gpt=GPT_TINY, num_codes=N, top_k=8, top_p=0.9)  # tests: the sampler compiles once


@pytest.fixture(scope="module")
def params():
    variables = jax.jit(GPT_TINY.init)(jax.random.key(0), jnp.zeros((1, GPT_TINY.block_size), jnp.int32))
    # Larger-than-init weights so the logits are far from uniform and the tests can tell apart.
    return jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x,
                        nn.meta.unbox(variables["params"]))


@jax.jit
def _forward(params, tokens):
    return GPT_TINY.apply({"params": params}, tokens)[0]


def forward(params, tokens):
    """Full recomputation (no cache), jitted once: tokens are padded to block_size."""
    tokens = np.asarray(tokens)
    t = tokens.shape[1]
    padded = np.pad(tokens, ((0, 0), (0, GPT_TINY.block_size - t)))
    return np.asarray(_forward(params, jnp.asarray(padded)))[:, :t]


def test_every_parameter_has_logical_axes_and_params_stay_float32():
    gpt = GPT_TINY.clone(dtype=jnp.bfloat16)
    variables = jax.jit(gpt.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    boxes = jax.tree.leaves(variables["params"],
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    # wte, wpe, ln_f (scale, bias), head + 12 a block; every leaf is boxed.
    assert len(boxes) == 5 + 12 * 2 == len(jax.tree.leaves(nn.meta.unbox(variables["params"])))
    for box in boxes:
        assert isinstance(box, nn.LogicallyPartitioned)
        assert len(box.names) == box.value.ndim
        assert set(box.names) <= {"embed", "heads", "mlp", "vocab", None}
        assert box.value.dtype == jnp.float32
    logits, _ = jax.jit(gpt.apply)({"params": nn.meta.unbox(variables["params"])},
                                   jnp.zeros((2, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 4, V)
    assert np.isfinite(np.asarray(logits)).all()


def test_kv_cache_gives_the_logits_of_the_full_recomputation(params):
    tokens = np.random.default_rng(0).integers(0, V, (3, GPT_TINY.block_size))
    tokens[:, 0] = V + np.array([0, 1, 2])
    full = forward(params, tokens)
    cache = GPT_TINY.init_cache(3)
    # A 3-token prefix in one call, then one token a call.
    step = jax.jit(lambda t, c, pos: GPT_TINY.apply({"params": params}, t, c, pos))
    logits, cache = step(jnp.asarray(tokens[:, :3]), cache, 0)
    pieces = [np.asarray(logits)]
    for pos in range(3, tokens.shape[1]):
        logits, cache = step(jnp.asarray(tokens[:, pos:pos + 1]), cache, pos)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-4, rtol=1e-5)


def test_a_later_token_never_changes_earlier_logits(params):
    tokens = np.random.default_rng(1).integers(0, V, (1, GPT_TINY.block_size))
    tokens[:, 0] = V
    base = forward(params, tokens)
    for t in (1, 7, GPT_TINY.block_size - 1):
        changed = tokens.copy()
        changed[0, t] = (tokens[0, t] + 5) % V
        out = forward(params, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-3  # and the changed position does see it


def test_top_k_1_is_greedy_argmax(params):
    prefix = PREFIX
    codes = np.asarray(autoregressive.sample(params, prefix, jax.random.key(3), gpt=GPT_TINY,
                                             num_codes=N, top_k=1))
    tokens = np.asarray(prefix)
    for _ in range(N):  # greedy decoding by full recomputation
        tokens = np.concatenate([tokens, forward(params, tokens)[:, -1:].argmax(-1)], 1)
    np.testing.assert_array_equal(codes, tokens[:, P:])


def test_cached_sampler_equals_recomputing_sampler_and_is_reproducible(params):
    prefix, kw = PREFIX, dict(KW, temperature=1.3)
    cached = np.asarray(autoregressive.sample(params, prefix, jax.random.key(5), **kw))
    recomputed = np.asarray(autoregressive.sample(params, prefix, jax.random.key(5),
                                                  use_cache=False, **kw))
    np.testing.assert_array_equal(cached, recomputed)
    assert cached.shape == (2, N) and cached.dtype == np.int32
    assert ((0 <= cached) & (cached < V)).all()
    np.testing.assert_array_equal(
        cached, np.asarray(autoregressive.sample(params, prefix, jax.random.key(5), **kw)))
    other = np.asarray(autoregressive.sample(params, prefix, jax.random.key(6), **kw))
    assert (other != cached).any()


def test_guidance_scale_1_is_the_conditional_and_0_the_unconditional_model(params):
    prefix, null, kw = PREFIX, jnp.array([[V + 2], [V + 2]]), KW
    rng = jax.random.key(7)
    plain = np.asarray(autoregressive.sample(params, prefix, rng, **kw))
    uncond = np.asarray(autoregressive.sample(params, null, rng, **kw))
    guided = lambda s: np.asarray(autoregressive.sample(params, prefix, rng, null_prefix=null,
                                                        guidance_scale=s, **kw))
    np.testing.assert_array_equal(guided(1.0), plain)
    np.testing.assert_array_equal(guided(0.0), uncond)
    assert (guided(3.0) != plain).any()


def _nucleus_reference(logits: np.ndarray, p: float) -> np.ndarray:
    """Brute force: for each row, the smallest set of most probable codes of mass >= p."""
    keep = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits.astype(np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        for size in range(1, len(row) + 1):
            top = np.argsort(-probs)[:size]
            if probs[top].sum() >= p:
                keep[r, top] = True
                break
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.92, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    logits = np.random.default_rng(2).normal(0, 2.0, (64, 50)).astype(np.float32)
    out = np.asarray(autoregressive.filter_logits(jnp.asarray(logits), top_p=top_p,
                                                  temperature=0.7))
    np.testing.assert_array_equal(np.isfinite(out), _nucleus_reference(logits / 0.7, top_p))
    np.testing.assert_allclose(out[np.isfinite(out)], (logits / 0.7)[np.isfinite(out)], rtol=1e-6)


def test_top_k_keeps_the_k_largest_and_combines_with_top_p():
    logits = np.random.default_rng(3).normal(0, 2.0, (32, 50)).astype(np.float32)
    out = np.asarray(autoregressive.filter_logits(jnp.asarray(logits), top_k=5))
    expected = np.zeros(logits.shape, bool)
    np.put_along_axis(expected, np.argsort(-logits, -1)[:, :5], True, -1)
    np.testing.assert_array_equal(np.isfinite(out), expected)
    both = np.asarray(autoregressive.filter_logits(jnp.asarray(logits), top_k=5, top_p=0.6))
    # top-p then acts on the renormalised top-5 distribution.
    top5 = np.where(expected, logits, -np.inf)
    np.testing.assert_array_equal(np.isfinite(both), _nucleus_reference(top5, 0.6))


def test_sliding_window_on_the_training_grid_is_the_plain_sampler(params):
    prefix = PREFIX
    kw = dict(top_k=KW["top_k"], top_p=KW["top_p"])
    plain = np.asarray(autoregressive.sample(params, prefix, jax.random.key(9), **KW))
    plain = plain.reshape(2, *GRID)
    window = np.asarray(autoregressive.sample_sliding_window(
        params, prefix, jax.random.key(9), gpt=GPT_TINY, grid=GRID, height=GRID[0],
        width=GRID[1], **kw))
    np.testing.assert_array_equal(window, plain)
    large = np.asarray(autoregressive.sample_sliding_window(
        params, prefix, jax.random.key(9), gpt=GPT_TINY, grid=GRID, height=6, width=9, **kw))
    assert large.shape == (2, 6, 9) and ((0 <= large) & (large < V)).all()
    # Until the window starts to move (j > gw // 2), row 0 sees exactly what the plain sampler saw.
    np.testing.assert_array_equal(large[:, 0, :GRID[1] // 2 + 1], plain[:, 0, :GRID[1] // 2 + 1])
    with pytest.raises(ValueError, match="smaller than the training grid"):
        autoregressive.sample_sliding_window(params, prefix, jax.random.key(9), gpt=GPT_TINY,
                                             grid=GRID, height=3, width=9)


def test_window_start_is_centred_and_clipped():
    starts = [int(autoregressive.window_start(i, 10, 4)) for i in range(10)]
    assert starts == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]


def test_sequence_longer_than_block_size_fails_before_compiling(params):
    with pytest.raises(ValueError, match="block_size >= 17"):
        autoregressive.sample(params, jnp.array([[V, V]]), jax.random.key(0), gpt=GPT_TINY,
                              num_codes=N)
