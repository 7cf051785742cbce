"""Workdirs written by an earlier release still restore, evaluate and sample.

tests/fixtures/previous_release/ holds a tiny demo tokenizer and a class-conditional GPT over its
codes, both written by the release at commit 356a946 (tests/fixtures/make_previous_release.sh
says how), and ``expected.json``: the images that release decoded from fixed codes.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import vqgan_jax
from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "previous_release"


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A copy of the fixture (nothing may write into the committed one), as the cwd: the
    GPT's config names its tokenizer by the relative path ``tokenizer``."""
    shutil.copytree(FIXTURE, tmp_path / "release")
    monkeypatch.chdir(tmp_path / "release")
    return tmp_path / "release"


def test_tokenizer_restores_and_decodes_as_the_release_did(release):
    expected = json.loads((release / "expected.json").read_text())
    tokenizer = vqgan_jax.load_tokenizer("tokenizer")
    assert (tokenizer.n_embed, tokenizer.downsample_factor) == (16, 4)
    decoded = tokenizer.decode(np.array(expected["codes"]))
    # The decoder's float32 output is rounded to uint8 levels: a rounding difference of the
    # CPU's arithmetic (about 1e-6 relative through 20 small layers) can move a value that lies
    # on a level boundary by one level, never more. Weights restored wrongly move most pixels
    # by many levels.
    difference = np.abs(decoded.astype(int) - np.array(expected["decoded"]))
    assert decoded.dtype == np.uint8 and difference.max() <= 1, difference.max()
    codes = tokenizer.encode(decoded)
    assert codes.shape == (2, 4, 4) and codes.min() >= 0 and codes.max() < 16


def test_generator_restores_and_samples(release):
    generator = vqgan_jax.load_generator("transformer")
    first = generator.sample(class_ids=[0, 1], num=1, seed=3)
    assert first.shape == (2, 16, 16, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, generator.sample(class_ids=[0, 1], num=1, seed=3))


def test_tokenizer_evaluates_from_the_command_line(release):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "vqgan_jax.evaluate", "--workdir=tokenizer", "--dataset=demo",
         "--split=validation", "--image_size=32", "--batch_size=2", "--num_images=2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((release / "tokenizer" / "eval.json").read_text())
    assert report["step"] == 2 and report["num_images"] == 2
    for key in ("psnr", "ssim", "lpips", "codebook_usage", "perplexity"):
        assert np.isfinite(report[key]), key
