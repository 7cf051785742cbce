"""Sampling a trained MaskGIT workdir (conftest's ``maskgit_run``: class-conditional, 2 classes,
4x4 codes of 16, trained 2 steps): the trainer's samples.png, ``samplers.maskgit.sample_images``,
``vqgan_jax.load_generator(...).sample`` on 8 devices, ``python -m vqgan_jax.sample`` and the
FID/IS evaluation (``scoring.evaluate_samples`` and ``python -m vqgan_jax.evaluate``)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import vqgan_jax
from conftest import MASKGIT_SAMPLE as GUIDED, ROOT
from vqgan_jax import metrics
from vqgan_jax.models.maskgit import MaskGIT
from vqgan_jax.samplers import autoregressive, maskgit as sampler
from vqgan_jax.state import maskgit as state_mg

# GUIDED: the run's config.sample, guided and scheduled (the run has class_drop_prob 0.5).


@pytest.fixture(scope="module")
def loaded(maskgit_run):
    """``load_for_sampling`` of the run at step 2 (one device)."""
    return state_mg.load_for_sampling(str(maskgit_run[1]))


@pytest.fixture(scope="module")
def gen(maskgit_run):
    return vqgan_jax.load_generator(maskgit_run[1])


def test_class_rows_are_the_model_tokens():
    model = MaskGIT(vocab_size=16, seq_len=16, num_classes=3)
    np.testing.assert_array_equal(sampler.class_rows(model, [2, 0], 2), [19, 19, 17, 17])
    with pytest.raises(ValueError, match=r"class_ids=\[3\]: give class ids in \[0, 3\)"):
        sampler.class_rows(model, [3], 1)
    with pytest.raises(ValueError, match=r"class_ids=\[\]: give class ids in \[0, 3\)"):
        sampler.class_rows(model, [], 1)
    unconditional = MaskGIT(vocab_size=16, seq_len=16)
    np.testing.assert_array_equal(sampler.class_rows(unconditional, [], 3), [17] * 3)
    with pytest.raises(ValueError, match=r"class_ids=\[0\] was given but the model is "
                       "unconditional"):
        sampler.class_rows(unconditional, [0], 1)


def test_samples_png_is_the_sampler_with_the_config_settings(maskgit_run, loaded):
    """The trainer's samples.png: a row per class of config.sample.num_per_row images drawn by
    sample_images with config.sample's settings and key(config.seed), decoded."""
    config, workdir, _ = maskgit_run
    params, frozen, sc, saved = loaded
    s = saved.sample
    assert {k: tuple(s[k]) if k == "guidance_interval" else s[k] for k in GUIDED} == GUIDED
    images = sampler.sample_images(
        params, frozen, sc, sampler.class_rows(sc.model, [0, 1], 2), jax.random.key(config.seed),
        **GUIDED)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.float32
    assert np.all(np.abs(images) <= 1.0)
    expected = autoregressive.image_grid(np.asarray(metrics.to_uint8(images)), 2)
    np.testing.assert_array_equal(np.asarray(Image.open(workdir / "samples.png")), expected)


def test_generator_sample_is_the_sampler_padded_and_seeded(gen, loaded):
    """Generator.sample on 8 devices (batch 4 padded to 8) draws what sample_images draws
    unpadded on one device; the same seed repeats, another seed differs."""
    params, frozen, sc, _ = loaded
    assert gen.kind == "maskgit" and gen.conditioning.kind == "class"
    assert gen.conditioning.num_classes == 2
    images = gen.sample(class_ids=[1, 0], num=2, seed=1, **GUIDED)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    expected = sampler.sample_images(params, frozen, sc, sampler.class_rows(sc.model, [1, 0], 2),
                                     jax.random.key(1), **GUIDED)
    np.testing.assert_array_equal(images, metrics.to_uint8(expected))
    np.testing.assert_array_equal(gen.sample(class_ids=[1, 0], num=2, seed=1, **GUIDED), images)
    assert not np.array_equal(gen.sample(class_ids=[1, 0], num=2, seed=2, **GUIDED), images)


def _no_program(*args, **kwargs):
    raise AssertionError("compiled a sampler for arguments that should have been refused")


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.9), r"top_p=0.9 applies to autoregressive \(GPT\) generators"),
    (dict(height=16), r"height=16 pixels: MaskGIT samples its training size 8 only"),
    (dict(width=10), r"width=10 pixels: MaskGIT samples its training size 8 only"),
    (dict(width=6), r"width=6 pixels; use a multiple of .* at least the training size 8"),
    (dict(num_steps=0), r"num_steps=0: give an int in \[1, 16\]"),
    (dict(num_steps=17), r"num_steps=17: give an int in \[1, 16\]"),
    (dict(choice_temperature=-1.0), r"choice_temperature=-1.0 must be >= 0"),
    (dict(temperature=0.0), r"temperature=0.0 must be > 0"),
    (dict(top_k=-1), r"top_k=-1"),
    (dict(guidance_scale=2.0, guidance_schedule="cosine"), r"kind='cosine' is not a guidance "
                                                           r"schedule"),
    (dict(guidance_scale=2.0, guidance_schedule="interval", guidance_interval=(0.5, 0.2)),
     r"interval=\(0.5, 0.2\)"),
    (dict(guidance_schedule="power_cosine", guidance_power=0.0), r"power=0.0"),
    (dict(class_ids=[2]), r"class_ids=\[2\]: give class ids in \[0, 2\)"),
    (dict(class_ids=None), r"class_ids=\[\]: give class ids in \[0, 2\)"),
])
def test_sample_refuses_bad_arguments_before_compiling(gen, monkeypatch, kwargs, message):
    monkeypatch.setattr(gen, "_program_maskgit", _no_program)
    monkeypatch.setattr(gen, "_program", _no_program)
    with pytest.raises(ValueError, match=message):
        gen.sample(**{"class_ids": [0], **kwargs})


def test_guidance_needs_a_class_model_and_the_grid_is_the_training_grid(loaded):
    sc = dataclasses.replace(loaded[2], num_classes=0)
    with pytest.raises(ValueError, match=r"guidance_scale=2.0 needs a class-conditional model"):
        sampler.check_sampling_args(sc, 4, 4, 2.0)
    with pytest.raises(ValueError, match=r"5x4 codes: MaskGIT samples its training grid only "
                       r"\(4x4 codes"):
        sampler.check_sampling_args(sc, 5, 4, 1.0)
    sampler.check_sampling_args(sc, 4, 4, 1.0, num_steps=16)  # the limits themselves pass


def test_sample_cli_on_a_maskgit_workdir(maskgit_run, gen, tmp_path):
    """`vqgan-jax sample` on the MaskGIT workdir with its flags: the picture Generator.sample
    draws; a GPT-only flag ends with the message."""
    out = tmp_path / "samples.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "vqgan_jax.cli", "sample", f"--workdir={maskgit_run[1]}",
         "--class_ids=1,0", "--num=2", "--seed=1", "--num_steps=4", "--top_k=4",
         "--choice_temperature=1.0", "--guidance_scale=2.0", "--guidance_schedule=interval",
         "--guidance_interval=0.25,0.75", f"--out={out}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The subprocess samples on its own device count (conftest's 8 are not inherited); a row's
    # draws do not depend on the batch's padding (threefry bits by position).
    expected = autoregressive.image_grid(gen.sample(class_ids=[1, 0], num=2, seed=1, **GUIDED), 2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_fid_and_inception_score_of_a_maskgit_workdir(maskgit_run, loaded, inception_weights,
                                                      monkeypatch, tmp_path):
    """scoring.evaluate_samples on the MaskGIT workdir: the images it scores are the samples
    drawn here by the MaskGIT sampler with the same settings (classes j % 2, batch i with key
    fold_in(key(3), i)), and FID and IS are the metrics of their features; the protocol records
    the MaskGIT settings. `python -m vqgan_jax.evaluate` passes its MaskGIT flags through to it
    (checked by the refusal of a GPT-only flag). The Inception network is replaced by 8 pixel
    values per image (features) and a softmax over 10 (class probabilities): running it on CPU
    costs a minute, and the GPT's test (tests/test_transformer.py) runs that same path."""
    from vqgan_jax import scoring

    _, workdir, _ = maskgit_run
    params, frozen, sc, _ = loaded
    expected = np.clip(sampler.sample_images(
        params, frozen, sc, sampler.class_rows(sc.model, [0, 1, 0], 1),
        jax.random.fold_in(jax.random.key(3), 0), **GUIDED), -1, 1)
    scored = []

    def features_and_probs(images):
        flat = np.asarray(images, np.float64).reshape(len(images), -1)
        return flat[:, :8], np.asarray(jax.nn.softmax(5 * flat[:, 8:18]))

    def inception_outputs(batches, variables, *, mesh, batch_size, with_probs=False):
        images = np.concatenate(list(batches))
        scored.append(images)
        stats = metrics.FeatureStats(dim=8)
        stats.add_features(features_and_probs(images)[0])
        return stats, features_and_probs(images)[1] if with_probs else None

    monkeypatch.setattr(metrics, "inception_outputs", inception_outputs)
    ref_mu = np.random.default_rng(0).normal(size=8)
    ref = str(tmp_path / "ref.npz")
    metrics.save_stats(ref, ref_mu, np.zeros((8, 8)), 3, {})
    report = scoring.evaluate_samples(str(workdir), num_samples=3, batch_size=3,
                                      inception_weights=inception_weights, ref_stats=ref, seed=3,
                                      **GUIDED)
    assert len(scored) == 1
    np.testing.assert_array_equal(scored[0], expected)
    features, probs = features_and_probs(expected)
    # Float64 moments of 3 samples x 8 features summed in another order: ~(3 + 8) eps64.
    np.testing.assert_allclose(report["fid"], metrics.frechet_distance(
        features.mean(0), np.cov(features.T), ref_mu, np.zeros((8, 8))),
        rtol=64 * np.finfo(np.float64).eps)
    assert report["inception_score"] == metrics.inception_score_from_probs(probs, 1)[0]
    assert 1.0 < report["inception_score"] <= 10.0  # one split of 3 distinct samples, 10 classes
    assert report["num_samples"] == 3 and report["step"] == 2
    protocol = report["protocol"]
    assert protocol["stage"] == "maskgit" and protocol["num_steps"] == 4
    assert protocol["guidance_schedule"] == "interval" and protocol["conditioning"] == "class"
    assert protocol["guidance_interval"] == [0.25, 0.75] and "top_p" not in protocol
    assert json.loads((workdir / "eval.json").read_text())["fid"] == report["fid"]

    result = subprocess.run(
        [sys.executable, "-m", "vqgan_jax.evaluate", f"--workdir={workdir}", "--num_samples=3",
         f"--inception_weights={inception_weights}", "--num_steps=4", "--top_p=0.9"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--top_p=0.9 applies to autoregressive" in result.stderr


def test_trainer_refuses_a_sample_config_it_cannot_draw(maskgit_run, loaded):
    """train_and_evaluate calls check_sample_config before training: samples.png comes last."""
    import ml_collections
    from vqgan_jax.trainers import maskgit as T

    config = ml_collections.ConfigDict(maskgit_run[0].to_dict())
    config.sample.num_steps = 17
    with pytest.raises(ValueError, match=r"config.sample: num_steps=17: give an int in \[1, 16\]"):
        T.check_sample_config(config, loaded[2])
    config.sample.num_per_row = 0  # no samples.png: nothing to refuse
    T.check_sample_config(config, loaded[2])
