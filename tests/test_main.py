"""The main job end to end for a few steps: a folder of images with a corrupt file (through the
real command line, then resumed), tfds mock data, and the missing-ImageNet error."""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

TINY = ["--config.image_size=32", "--config.batch_size=4", "--config.model.ch=32",
        "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=(16,)", "--config.model.z_channels=8",
        "--config.model.embed_dim=8", "--config.model.n_embed=32", "--config.disc.ndf=8",
        "--config.disc.n_layers=2", "--config.log_every_steps=1", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.num_eval_images=2",
        "--config.loss.disc_start=1", "--config.loss.perceptual_weight=0.1"]


def run_main(workdir, *flags, timeout=300):
    """``python -m vqgan_jax.main`` run from workdir's parent, with a relative --workdir."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "vqgan_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}",
         f"--workdir={workdir.name}", *TINY, *flags],
        cwd=workdir.parent, env=env, capture_output=True, text=True, timeout=timeout)


def make_folder(root: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (48 + 8 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dogs" / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    return root


def test_main_on_a_folder_writes_outputs_and_resumes(tmp_path):
    data = make_folder(tmp_path / "images")
    workdir = tmp_path / "run"
    result = run_main(workdir, f"--config.dataset=folder:{data}", "--config.num_train_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "corrupt.jpg" in result.stderr  # the undecodable file is logged and skipped
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["step"] == 3
    for key in ("psnr", "lpips", "codebook_usage", "perplexity"):
        assert np.isfinite(metrics[key]), key
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1
    picture = Image.open(workdir / "reconstructions.png")
    assert picture.size[1] >= 2 * 32  # two held-out rows of original | reconstruction
    assert list(workdir.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]

    result = run_main(workdir, f"--config.dataset=folder:{data}", "--config.num_train_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from step 3 to 4" in result.stderr
    assert json.loads((workdir / "metrics.json").read_text())["step"] == 4


def test_main_on_tfds_mock_imagenet(tmp_path):
    import tensorflow_datasets as tfds
    from conftest import load_config, shrink
    from vqgan_jax.trainers import tokenizer

    config = shrink(load_config("imagenet_f16"))
    config.update(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=1,
                  num_eval_images=2, eval_every_steps=100)
    # In-process, the job sees conftest's 8 simulated devices: shrink's global batch of 8 is
    # one image a device on the (8 data x 1 fsdp) mesh.
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        metrics = tokenizer.train_and_evaluate(config, str(tmp_path))
    assert metrics["num_images"] == 2 and np.isfinite(metrics["psnr"])
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 2


def test_missing_imagenet_fails_fast_with_instructions(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "vqgan_jax.main", "--config=configs/imagenet_f16.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data_dir={tmp_path / 'tfds'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "downloads/manual" in result.stderr and "folder:" in result.stderr
    assert time.monotonic() - start < 60
