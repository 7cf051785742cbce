"""Stage 2 end to end: configs, the loss, the train job (and its resume) and the
sample command line, over a tiny stage-1 tokenizer checkpoint (conftest's tokenizer_workdir and
gpt_run fixtures)."""

import contextlib
import functools
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import CONFIG_DIR, ROOT, load_config, tiny
from vqgan_jax import parallel
from vqgan_jax.models import registry
from vqgan_jax.models.gpt import GPT
from vqgan_jax.samplers import autoregressive
from vqgan_jax.state import transformer as state2
from vqgan_jax.trainers import transformer as T

TRANSFORMER_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                             if load_config(p.stem).stage == "transformer")
# GPT parameters: 12 C^2 + 13 C a layer, (V + cond tokens) C + block_size C embeddings,
# 2 C final LayerNorm, C V head.
PARAMETER_COUNTS = {"imagenet_cond_transformer": 1_412_178_432, "demo_transformer": 1_089_408}
VOCAB = {"imagenet_cond_transformer": 16384, "demo_transformer": 1024}  # their tokenizers'


@contextlib.contextmanager
def absl_logs():
    """Collects what absl logs (INFO and up) while the block runs, in ``.text``."""
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


@pytest.mark.parametrize("name", TRANSFORMER_CONFIGS)
def test_transformer_config_counts_and_builds_at_tiny_size(name, tokenizer_workdir):
    config = load_config(name)
    assert config.tokenizer_workdir and config.conditioning in registry.CONDITIONINGS
    gpt = GPT(vocab_size=VOCAB[name], n_cond_tokens=config.num_classes + 1, **config.model)
    abstract = jax.eval_shape(gpt.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == PARAMETER_COUNTS[name]

    config = tiny(config, tokenizer_workdir)
    state2.validate_config(config, num_devices=8)
    sc = state2.build_step_config(config)
    assert sc.grid == (4, 4) and sc.gpt.vocab_size == 16
    state = jax.jit(functools.partial(state2.init_state, sc=sc))(jax.random.key(0))
    codes = jnp.zeros((2, 16), jnp.int32)
    loss, _ = jax.jit(functools.partial(T.loss_fn, sc=sc, rng=None))(
        state.params, sc.conditioning.class_prefix(jnp.array([0, 1])), codes, codes)
    assert abs(float(loss) - math.log(16)) < 0.5  # a fresh model is near uniform over codes


def test_loss_covers_the_image_codes_only():
    """loss_fn against a float64 cross-entropy of the logits read at the code positions."""
    gpt = GPT(vocab_size=8, block_size=12, n_layer=1, n_head=2, n_embd=16, n_cond_tokens=4)
    params = jax.jit(gpt.init)(jax.random.key(1), jnp.zeros((1, 12), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 30.0, jax.tree.map(
        lambda b: b.value, params, is_leaf=lambda b: hasattr(b, "names")))
    sc = state2.StepConfig(gpt=gpt, vq=None, cond_vq=None, conditioning=None, tx=None, grid=(3, 3),
                      cond_image_size=0, class_drop_prob=0.0, pkeep=1.0, seed=0)
    rng = np.random.default_rng(0)
    prefix = jnp.asarray(8 + rng.integers(0, 4, (2, 4)))  # 4 condition tokens
    codes = jnp.asarray(rng.integers(0, 8, (2, 9)))
    loss, _ = jax.jit(functools.partial(T.loss_fn, sc=sc, rng=None))(params, prefix, codes, codes)
    logits, _ = jax.jit(gpt.apply)({"params": params}, jnp.concatenate([prefix, codes[:, :-1]], 1))
    logits = np.asarray(logits, np.float64)[:, 3:]  # from the last prefix token on
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, np.asarray(codes)[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_image_conditioning_prefixes_the_cond_stage_codes(tokenizer_workdir):
    config = tiny(load_config("demo_transformer"), tokenizer_workdir)
    config.update(conditioning="image", cond_tokenizer_workdir=tokenizer_workdir,
                  cond_image_size=4, pkeep=0.5)
    config.model.block_size = 4 + 16 - 1  # a 2x2 condition grid, then 4x4 codes
    state2.validate_config(config, num_devices=8)
    sc = state2.build_step_config(config)
    mesh = parallel.create_mesh()
    frozen, _ = state2.load_frozen(config, sc, mesh)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    batch = {"image": jnp.asarray(images), "label": jnp.zeros(8, jnp.int32)}
    prefix, codes = jax.jit(functools.partial(T.prefix_and_codes, sc=sc, rng=None))(batch, frozen)
    assert prefix.shape == (8, 4) and codes.shape == (8, 16)
    assert int(prefix.min()) >= 16 and int(prefix.max()) < 32  # cond codes after the 16 codes
    state = jax.jit(functools.partial(state2.init_state, sc=sc))(jax.random.key(0))
    loss, _ = jax.jit(functools.partial(T.loss_fn, sc=sc, rng=None))(state.params, prefix, codes,
                                                                     codes)
    assert abs(float(loss) - math.log(16)) < 0.5
    config.model.block_size = 18
    with pytest.raises(ValueError, match="config.model.block_size=18 is shorter.*>= 19"):
        state2.validate_config(config, num_devices=8)


@pytest.mark.parametrize("update, message", [
    (dict(tokenizer_workdir="MISSING"), r"config.tokenizer_workdir=.*no checkpoint.*make demo"),
    (dict(batch_size=6), "not divisible by the 4 devices"),
    (dict(conditioning="text"), "config.conditioning"),
    (dict(pkeep=0.0), "config.pkeep"),
    (dict(image_size=9), "not divisible by the tokenizer's downsampling factor 2"),
])
def test_bad_config_fails_naming_the_field(update, message, tokenizer_workdir, tmp_path):
    config = tiny(load_config("demo_transformer"), tokenizer_workdir)
    if update.get("tokenizer_workdir") == "MISSING":
        update = dict(tokenizer_workdir=str(tmp_path / "never_trained"))
    config.update(update)
    with pytest.raises(ValueError, match=message):
        state2.validate_config(config, num_devices=4)


def test_train_resume_and_sample_cli(gpt_run, tmp_path):
    config, trained, metrics = gpt_run
    config = ml_collections.ConfigDict(config.to_dict())
    workdir = tmp_path / "gpt"
    shutil.copytree(trained, workdir)  # resumed below: the shared workdir stays at step 2
    assert metrics["step"] == 2
    assert abs(metrics["loss"] - math.log(16)) < 0.5
    np.testing.assert_allclose(metrics["bits_per_code"], metrics["loss"] / math.log(2), rtol=1e-5)
    assert metrics["codes_per_s"] > 0 and 0 <= metrics["accuracy"] <= 1
    assert Image.open(workdir / "samples.png").size == (2 * 8 + 2, 2 * 8 + 2)  # 2 classes x 2
    assert list(workdir.glob("events.out.tfevents.*"))

    config.num_train_steps = 3
    config.sample.num_per_row = 0  # samples.png was checked above
    with absl_logs() as logs:
        T.train_and_evaluate(config, str(workdir))
    assert "Resumed from" in logs.text and "from step 2 to 3" in logs.text
    assert json.loads((workdir / "metrics.json").read_text())["step"] == 3
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]
    # Started again when finished: nothing to train, and metrics.json keeps its figures.
    finished = json.loads((workdir / "metrics.json").read_text())
    assert T.train_and_evaluate(config, str(workdir)) == finished
    assert json.loads((workdir / "metrics.json").read_text()) == finished

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = tmp_path / "large.png"
    result = subprocess.run(
        # The console script's dispatcher (`vqgan-jax sample`), which runs vqgan_jax.sample.
        [sys.executable, "-m", "vqgan_jax.cli", "sample", f"--workdir={workdir}", "--class_ids=0,1",
         "--num=3", "--top_k=4", "--top_p=0.9", "--temperature=1.0", "--guidance_scale=2.0",
         "--height=6", "--width=5", "--seed=1", f"--out={out}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 rows (classes) x 3 samples of 6x5 codes = 12x10 pixels, 2-pixel gaps.
    assert Image.open(out).size == (3 * 10 + 2 * 2, 2 * 12 + 2)


def test_sample_fid_and_inception_score_of_a_stage2_workdir(gpt_run, inception_weights,
                                                            tmp_path):
    """scoring.evaluate_samples: FID of the workdir's samples against statistics of the same
    samples drawn independently (same seed scheme, classes j % num_classes) is ~0; IS is in
    [1, 1008]; the protocol records the sampler's settings."""
    from vqgan_jax import metrics, scoring
    from vqgan_jax.models import inception

    workdir = str(gpt_run[1])  # the trained GPT at step 2 (evaluate_samples adds eval.json)
    weights = inception_weights

    params, frozen, sc, _ = state2.load_for_sampling(workdir)
    rng, settings = jax.random.key(3), dict(top_k=4, top_p=0.9, temperature=1.0)
    samples = [np.clip(autoregressive.sample_images(
                   params, frozen, sc, autoregressive.class_rows(sc.conditioning, c, 1),
                   jax.random.fold_in(rng, i), **settings), -1, 1)
               for i, c in enumerate(([0, 1, 0], [1, 0]))]  # batches of 3: classes j % 2
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    variables = inception.load_inception_params(weights)
    stats, _ = metrics.inception_outputs(samples, variables, mesh=mesh, batch_size=3)
    ref = str(tmp_path / "ref.npz")
    metrics.save_stats(ref, stats.mu, stats.sigma, 5, {})

    report = scoring.evaluate_samples(workdir, num_samples=5, batch_size=3,
                                      inception_weights=weights, ref_stats=ref, seed=3,
                                      **settings)
    assert abs(report["fid"]) < 1e-3 * max(1.0, float(np.trace(stats.sigma)))
    assert 1.0 < report["inception_score"] <= 1008.0  # one split of 5 distinct samples
    assert report["num_samples"] == 5 and report["step"] == 2
    assert report["protocol"]["top_k"] == 4 and report["protocol"]["conditioning"] == "class"
    assert json.loads((gpt_run[1] / "eval.json").read_text())["fid"] == report["fid"]
    with pytest.raises(ValueError, match="--top_p"):
        scoring.evaluate_samples(workdir, num_samples=5, inception_weights=weights, top_p=0)
    with pytest.raises(ValueError, match=r"--num_steps=4 applies to MaskGIT workdirs"):
        scoring.evaluate_samples(workdir, num_samples=5, inception_weights=weights, num_steps=4)
    result = subprocess.run([sys.executable, "-m", "vqgan_jax.evaluate", f"--workdir={workdir}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "stage-2 workdir is scored by FID" in result.stderr
