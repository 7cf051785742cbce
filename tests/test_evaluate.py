"""python -m vqgan_jax.evaluate end to end: a tokenizer workdir (random weights at step 1) and a
folder of images, evaluated by the library function (with rFID from random Inception weights and
reference statistics) and by the command line; the errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import (ROOT, built_once, load_config, random_inception_state_dict, shrink,
                      write_random_tokenizer)
from vqgan_jax import metrics, parallel, scoring, workdir
from vqgan_jax.data import pipeline, sources
from vqgan_jax.models import registry
from vqgan_jax.models.lpips import load_lpips_params

KEYS = {"psnr", "ssim", "lpips", "codebook_usage", "perplexity", "num_images", "step",
        "protocol", "notes"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 32x32 tokenizer workdir (random weights, step 1: what is scored does not need training)
    and 5 generated images, built once per session; each worker evaluates its own copy."""
    def build(shared):
        data = shared / "images"
        rng = np.random.default_rng(0)
        for label, count in (("a", 3), ("b", 2)):
            (data / label).mkdir(parents=True)
            for i in range(count):  # smooth gradients plus noise, 40-56 px: crops and resizes matter
                h, w = 40 + 4 * i, 56 - 4 * i
                ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
                pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(data / label / f"{i}.png")
        config = shrink(load_config("demo"))
        config.update(dataset=f"folder:{data}")
        write_random_tokenizer(shared / "run", config, rng)
        np.savez(shared / "inception.npz", **random_inception_state_dict())
    shared = built_once(tmp_path_factory, "evaluate", build)
    root = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(shared / "run", root / "run")
    return dict(workdir=str(root / "run"), dataset=f"folder:{shared / 'images'}",
                data=shared / "images", weights=str(shared / "inception.npz"), root=root)


def test_library_evaluation_with_rfid_and_reference_stats(trained):
    ref_path = str(trained["root"] / "ref.npz")
    common = dict(dataset=trained["dataset"], split="validation", image_size=32, batch_size=8,
                  inception_weights=trained["weights"])
    written = scoring.write_reference_stats(ref_path, **common)
    assert written["num_images"] == 5 and written["num_skipped"] == 0
    report = scoring.evaluate_workdir(trained["workdir"], ref_stats=ref_path, **common)

    assert json.loads((trained["root"] / "run" / "eval.json").read_text()) == report
    assert set(report) == KEYS | {"rfid"}
    assert np.isfinite(report["rfid"]) and report["rfid"] >= 0
    assert report["num_images"] == 5 and report["step"] == 1  # one batch of 8, 3 rows padding
    protocol = report["protocol"]
    assert protocol["split"] == "validation" and protocol["dataset"] == trained["dataset"]
    assert protocol["image_size"] == 32 and protocol["num_images"] == 5
    assert protocol["dtype"] == "float32" and protocol["ref_stats"] == "ref.npz"
    assert protocol["inception"].startswith("pt_inception-2015-12-05")
    assert "center" in protocol["resize"] or "central" in protocol["resize"]
    assert any("biased upward" in n for n in report["notes"])
    with Image.open(trained["root"] / "run" / "eval_reconstructions.png") as grid:
        assert grid.size[1] >= 5 * 32 and grid.size[0] >= 2 * 32  # 5 rows: original | reconstruction

    # The same figures as the demo's metrics.json code path on the same (cropped) images:
    # padding rows of the last batch are masked out of every mean and count.
    # On one device: replicated on the 8 simulated ones, each image would be computed 8 times
    # on the same CPU cores (the report above ran batch-sharded on all 8).
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    config, g_params, _ = workdir.restore_tokenizer(trained["workdir"], None, mesh)
    source = sources.get_source(trained["dataset"], "validation")
    images = [pipeline.center_crop_resize(source[i]["image"], 32) for i in range(5)]
    vq = registry.build_models(config)[0]
    direct, _ = scoring.evaluate(g_params, load_lpips_params(), images, vq)
    for key in ("psnr", "ssim", "lpips", "codebook_usage", "perplexity"):
        np.testing.assert_allclose(report[key], direct[key], rtol=1e-4, err_msg=key)
    assert 0 < report["psnr"] < 100 and 0 < report["ssim"] < 1 and report["lpips"] > 0
    assert 0 < report["codebook_usage"] <= 1 and report["perplexity"] >= 1

    # The reference file holds the originals' Inception statistics.
    mu, sigma, stored = metrics.load_stats(ref_path)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and stored["num_images"] == 5


def test_command_line_without_inception(trained):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "vqgan_jax.evaluate", f"--workdir={trained['workdir']}",
         f"--dataset={trained['dataset']}", "--split=validation", "--num_images=3",
         "--image_size=32", "--batch_size=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((trained["root"] / "run" / "eval.json").read_text())
    assert set(report) == KEYS  # no rfid / fid / inception_score without weights
    assert report["num_images"] == 3 and report["protocol"]["num_images"] == 3
    assert report["protocol"]["inception"] is None
    assert any("--inception_weights" in n and "pt_inception-2015-12-05" in n
               for n in report["notes"])
    assert all(np.isfinite(report[k]) for k in ("psnr", "ssim", "lpips", "perplexity"))


def test_bad_input_names_the_flag(trained, tmp_path):
    common = dict(dataset=trained["dataset"], image_size=32, batch_size=8)
    with pytest.raises(ValueError, match="--workdir=.*does not exist"):
        scoring.evaluate_workdir(str(tmp_path / "nowhere"), **common)
    with pytest.raises(ValueError, match="--workdir=.*no checkpoints/"):
        scoring.evaluate_workdir(str(tmp_path), **common)
    with pytest.raises(ValueError, match="--step=7: no checkpoint"):
        scoring.evaluate_workdir(trained["workdir"], step=7, **common)
    with pytest.raises(ValueError, match="--dataset=folder:/no/such/folder"):
        scoring.evaluate_workdir(trained["workdir"], **dict(common, dataset="folder:/no/such/folder"))
    with pytest.raises(ValueError, match="--batch_size=12 .* multiple of the 8 devices"):
        scoring.evaluate_workdir(trained["workdir"], **dict(common, batch_size=12))
    with pytest.raises(FileNotFoundError, match="--inception_weights=.*does not exist"):
        scoring.evaluate_workdir(trained["workdir"], inception_weights=str(tmp_path / "x.pth"),
                                 **common)
    np.savez(tmp_path / "not_inception.npz", weight=np.zeros(3))
    with pytest.raises(ValueError, match=r"--inception_weights.*has no key 'Conv2d_1a_3x3\."):
        scoring.evaluate_workdir(trained["workdir"],
                                 inception_weights=str(tmp_path / "not_inception.npz"), **common)
    metrics.save_stats(str(tmp_path / "ref64.npz"), np.zeros(2048), np.eye(2048), 5,
                       dict(dataset=trained["dataset"], split="validation", image_size=64))
    with pytest.raises(ValueError, match="--ref_stats=.*image_size=64.*--write_ref_stats"):
        scoring.evaluate_workdir(trained["workdir"], inception_weights=trained["weights"],
                                 ref_stats=str(tmp_path / "ref64.npz"), **common)
