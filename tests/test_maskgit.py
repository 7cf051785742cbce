"""Stage 2 by masked-token generation (MaskGIT): configs and their exact parameter counts, the
training mask (MaskGIT eq. 2's cosine schedule), the masked-code loss against float64 numpy,
the step on a sharded mesh, and the train job with its resume, over conftest's tiny stage-1
tokenizer."""

import contextlib
import functools
import json
import math
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import CONFIG_DIR, load_config, tiny_maskgit
from vqgan_jax import parallel, workdir as workdir_lib
from vqgan_jax.models import maskgit as maskgit_lib, registry
from vqgan_jax.state import maskgit as state_mg
from vqgan_jax.trainers import maskgit as T

MASKGIT_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                         if load_config(p.stem).stage == "maskgit")
# Embeddings (V + 2 + C) d + (N + 1) d, 12 d^2 + 13 d a block, 2 d final LayerNorm, d V + V head.
PARAMETER_COUNTS = {"imagenet_maskgit": 172_651_264, "demo_maskgit": 1_090_688}
# Their tokenizers: codebook size and downsampling factor (configs/imagenet_f16.py, demo.py).
TOKENIZERS = {"imagenet_maskgit": (1024, 16), "demo_maskgit": (1024, 4)}
EPS = float(np.finfo(np.float32).eps)


tiny = tiny_maskgit  # conftest's: 8x8 images -> 4x4 codes of 16, two classes, one block


@contextlib.contextmanager
def absl_logs():
    """What absl logs (INFO and up) while the block runs, in ``.text``."""
    from absl import logging as absl_logging
    import logging as std_logging

    class Collect(std_logging.Handler):
        text = ""

        def emit(self, record):
            Collect.text += self.format(record) + "\n"

    handler, logger = Collect(), absl_logging.get_absl_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(std_logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_every_maskgit_config_has_a_count():
    assert set(MASKGIT_CONFIGS) == set(PARAMETER_COUNTS)


@pytest.mark.parametrize("name", MASKGIT_CONFIGS)
def test_config_parameter_count_and_tiny_build(name, tokenizer_workdir):
    config = load_config(name)
    n_embed, f = TOKENIZERS[name]
    model = registry.build_maskgit(config, types.SimpleNamespace(n_embed=n_embed,
                                                                 downsample_factor=f))
    assert (model.vocab_size, model.seq_len, model.num_classes) == (n_embed, 256,
                                                                     config.num_classes)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256), jnp.int32),
                              jnp.zeros((1,), jnp.int32))
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    formula = maskgit_lib.num_params(n_embed, 256, config.num_classes, config.model.n_layer,
                                     config.model.n_embd)
    assert counted == formula == PARAMETER_COUNTS[name]

    config = tiny(config, tokenizer_workdir)
    state_mg.validate_config(config, num_devices=8)
    sc = state_mg.build_step_config(config)
    assert sc.grid == (4, 4) and (sc.model.vocab_size, sc.model.seq_len) == (16, 16)
    assert sc.num_classes == sc.model.num_classes == 2 and sc.model.null_token == 16 + 1 + 2
    config.conditioning = "unconditional"
    assert state_mg.build_step_config(config).model.num_classes == 0


def test_mask_counts_follow_the_cosine_schedule():
    n = 16
    u = np.array([1.0, 0.9, 0.77, 0.5, 0.31, 0.1, 0.013, 0.05])
    r = np.cos(np.pi / 2 * u)
    # Away from ceil's jumps, float32 and float64 agree (u = 1: float32 cos(pi/2) < 0, clipped).
    assert np.all((np.abs(r * n - np.round(r * n)) > 1e-3) | (u == 1.0))
    expected = np.maximum(1, np.ceil(r * n)).astype(int)
    assert list(expected) == [1, 3, 6, 12, 15, 16, 16, 16]
    num_masked = jax.jit(T.num_masked, static_argnums=1)
    mask_from_noise = jax.jit(T.mask_from_noise)
    np.testing.assert_array_equal(num_masked(jnp.asarray(u, jnp.float32), n), expected)
    np.testing.assert_allclose(T.mask_ratio(jnp.array([0.0, 1.0])), [1.0, 0.0], atol=EPS)

    noise = np.random.default_rng(0).uniform(size=(len(u), n)).astype(np.float32)
    mask = np.asarray(mask_from_noise(jnp.asarray(u, jnp.float32), jnp.asarray(noise)))
    np.testing.assert_array_equal(mask.sum(1), expected)
    # Exactly the positions of the smallest noise values.
    threshold = np.sort(noise, 1)[np.arange(len(u)), expected - 1]
    np.testing.assert_array_equal(mask, noise <= threshold[:, None])
    # Ties (constant noise) still mask exactly n per row.
    tied = mask_from_noise(jnp.asarray(u, jnp.float32), jnp.zeros((len(u), n)))
    np.testing.assert_array_equal(np.asarray(tied).sum(1), expected)

    mask, u = jax.jit(T.random_mask, static_argnums=(1, 2))(jax.random.key(3), 64, n)
    assert mask.shape == (64, n) and np.all((np.asarray(u) > 0) & (np.asarray(u) <= 1))
    np.testing.assert_array_equal(np.asarray(mask).sum(1), num_masked(u, n))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_is_the_cross_entropy_of_the_masked_codes(label_smoothing):
    """loss_fn against a float64 cross-entropy (smoothed targets) over the masked positions."""
    model = maskgit_lib.MaskGIT(vocab_size=8, seq_len=6, num_classes=3, n_layer=1, n_head=2,
                                n_embd=16)
    codes = np.random.default_rng(0).integers(0, 8, (2, 6))
    cond = model.class_tokens(jnp.array([0, 2]))
    params = jax.jit(model.init)(jax.random.key(1), jnp.asarray(codes), cond)["params"]
    params = jax.tree.map(lambda x: 10.0 * x.value, params,  # logits of a few units
                          is_leaf=lambda b: hasattr(b, "names"))
    sc = state_mg.StepConfig(model=model, vq=None, tx=None, grid=(2, 3), num_classes=3,
                             class_drop_prob=0.0, label_smoothing=label_smoothing, seed=0)
    mask = np.array([[1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], bool)
    loss, aux = jax.jit(functools.partial(T.loss_fn, sc=sc, rng=None))(
        params, jnp.asarray(codes), cond, jnp.asarray(mask))

    inputs = np.where(mask, model.mask_token, codes)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(inputs), cond),
                        np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = (1 - label_smoothing) * np.eye(8)[codes] + label_smoothing / 8
    ce = -(targets * log_probs).sum(-1)
    expected = ce[mask].sum() / mask.sum()
    # float32 log-softmax over V = 8 logits of size |z| and a sum of 4 masked terms.
    tol = EPS * (8 + 4) * max(1.0, np.abs(logits).max())
    assert np.abs(logits).max() > 1.0  # logits away from uniform, so the check has teeth
    assert abs(float(loss) - expected) < tol, (float(loss), expected)
    accuracy = (logits.argmax(-1) == codes)[mask].mean()
    assert float(aux["masked_accuracy"]) == pytest.approx(accuracy)


def _loss_and_grad_norm(mesh, sc, params, codes, labels):
    """Class drop, mask, loss and gradient norm at ``params``, laid out on ``mesh`` by
    TRANSFORMER_RULES (as the trainer lays them out, but sharding arrays of any size) and
    jitted there."""
    rules = parallel.rules_from_config(load_config("demo_maskgit"))
    boxed = jax.eval_shape(functools.partial(state_mg.init_state, sc=sc, boxed=True),
                           jax.random.key(0)).params
    shardings = parallel.state_shardings(boxed, mesh, rules, min_size=1)
    params = jax.device_put(params, shardings)
    head_spec = tuple(shardings["head"]["kernel"].spec)

    def f(params, codes, labels):
        drop_rng, mask_rng = jax.random.split(jax.random.key(5))
        cond = T.cond_tokens(labels, codes.shape[0], sc, drop_rng)
        mask, _ = T.random_mask(mask_rng, *codes.shape)
        loss, aux = T.loss_fn(params, codes, cond, mask, sc, None)
        return dict(loss=loss, masked=jnp.sum(mask),
                    dropped=jnp.sum(cond == sc.model.null_token), **aux)

    data = parallel.batch_sharding(mesh)
    step = jax.jit(f, in_shardings=(shardings, data, data),
                   out_shardings=parallel.replicated(mesh))
    with parallel.sharding_context(mesh, rules):
        batch = parallel.global_batch({"codes": codes, "labels": labels}, mesh)
        return dict(jax.device_get(step(params, batch["codes"], batch["labels"])),
                    head_spec=head_spec)


def test_loss_on_a_sharded_mesh_matches_one_device():
    model = maskgit_lib.MaskGIT(vocab_size=16, seq_len=16, num_classes=2, n_layer=1, n_head=2,
                                n_embd=32)
    sc = state_mg.StepConfig(model=model, vq=None, tx=optax.sgd(1.0), grid=(4, 4),
                             num_classes=2, class_drop_prob=0.5, label_smoothing=0.1, seed=0)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (8, 16)).astype(np.int32)
    labels = rng.integers(0, 2, 8).astype(np.int32)
    params = jax.device_get(jax.jit(functools.partial(state_mg.init_state, sc=sc))(
        jax.random.key(0)).params)
    one = _loss_and_grad_norm(parallel.create_mesh(devices=jax.devices()[:1]), sc, params,
                              codes, labels)
    many = _loss_and_grad_norm(parallel.create_mesh(data=2, fsdp=2, tensor=2), sc, params,
                               codes, labels)
    # The layout is really split: the head's kernel (embed, vocab) over fsdp and tensor.
    assert many["head_spec"] == ("fsdp", "tensor") and one["head_spec"] == (None, None)
    # Same masks and class drops (threefry bits do not depend on the sharding).
    assert (many["masked"], many["dropped"]) == (one["masked"], one["dropped"])
    assert 8 <= one["masked"] <= 128 and 0 < one["dropped"] < 8
    # Sums over B x N = 128 codes and contractions over <= 4 * 32 = 128 features: float32
    # rounding grows at most ~(128 + 128) eps relative.
    tol = (128 + 128) * EPS
    np.testing.assert_allclose(many["loss"], one["loss"], rtol=tol)
    assert many["masked_accuracy"] == one["masked_accuracy"]
    assert abs(one["loss"] - math.log(16)) < 0.5  # a fresh model is near uniform over 16 codes


def test_train_resume_metrics_and_load_for_sampling(maskgit_run, tokenizer_workdir, tmp_path):
    config, trained, metrics = maskgit_run
    workdir = tmp_path / "maskgit"
    shutil.copytree(trained, workdir)  # resumed below: the shared workdir stays at step 2
    assert metrics["step"] == 2 and json.loads((workdir / "metrics.json").read_text()) == metrics
    assert abs(metrics["loss"] - math.log(16)) < 0.5
    assert 0 <= metrics["masked_accuracy"] <= 1 and 0 < metrics["mask_ratio"] <= 1
    assert metrics["codes_per_s"] > 0 and metrics["nonfinite_steps"] == 0
    # 2 classes x 2 samples of 8x8 pixels, 2-pixel gaps (its pixels: tests/test_maskgit_generate.py).
    assert Image.open(workdir / "samples.png").size == (2 * 8 + 2, 2 * 8 + 2)

    config = ml_collections.ConfigDict(config.to_dict())
    config.num_train_steps = 3
    config.sample.num_per_row = 0  # samples.png was checked above
    with absl_logs() as logs:
        T.train_and_evaluate(config, str(workdir))
    assert "Resumed from" in logs.text and "from step 2 to 3" in logs.text
    assert json.loads((workdir / "metrics.json").read_text())["step"] == 3
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]

    params, frozen, sc, saved = state_mg.load_for_sampling(str(workdir), step=1)
    assert saved.stage == "maskgit" and sc.model.seq_len == 16 and set(frozen) == {"tokenizer"}
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(functools.partial(state_mg.init_state, sc=sc), jax.random.key(0)).params)
    with pytest.raises(ValueError, match=r"holds a 'maskgit' run; point it at a stage-2 "
                       r"\(transformer\) workdir \('maskgit' and 'transformer' are both"):
        workdir_lib.read_config(str(workdir), "--workdir", stage="transformer")
    with pytest.raises(ValueError, match=r"holds a 'tokenizer' run; point it at a stage-2 "
                       r"\(maskgit\) workdir\.$"):
        state_mg.load_for_sampling(tokenizer_workdir)


@pytest.mark.parametrize("update, message", [
    (dict(tokenizer_workdir="MISSING"), r"config.tokenizer_workdir=.*no checkpoint.*make demo"),
    (dict(tokenizer_workdir=""), r"config.tokenizer_workdir is empty"),
    (dict(batch_size=6), "not divisible by the 4 devices"),
    (dict(conditioning="image"), r"config.conditioning='image': .*'class' or 'unconditional'"),
    (dict(conditioning="text"), r"config.conditioning='text'"),
    (dict(num_classes=0), r"config.num_classes=0"),
    (dict(class_drop_prob=1.0), r"config.class_drop_prob=1.0 must be in \[0, 1\)"),
    (dict(label_smoothing=-0.1), r"config.label_smoothing=-0.1 must be in \[0, 1\)"),
    (dict(model=dict(n_head=3)), r"config.model.n_embd=32 is not divisible by "
                                 r"config.model.n_head=3"),
    (dict(image_size=9), "not divisible by the tokenizer's downsampling factor 2"),
    (dict(dtype="float16"), r"config.dtype='float16'"),
])
def test_bad_config_fails_naming_the_field(update, message, tokenizer_workdir, tmp_path):
    config = tiny(load_config("demo_maskgit"), tokenizer_workdir)
    if update.get("tokenizer_workdir") == "MISSING":
        update = dict(tokenizer_workdir=str(tmp_path / "never_trained"))
    config.update(update)
    with pytest.raises(ValueError, match=message):
        state_mg.validate_config(config, num_devices=4)
