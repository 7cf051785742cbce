"""The main job end to end for a few steps: tfds mock data, and the missing-ImageNet error.

The command line on a folder of images with a corrupt file (outputs, checkpoints, evaluation,
crossing disc_start, resuming) is tested by the straight and resumed runs of
tests/test_reliability.py; tests/test_multihost.py runs it as two processes. Both use TINY and
make_folder from here."""

import json
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
        "--config.loss.disc_start=0", "--config.loss.perceptual_weight=0",
        "--config.optimizer.lr_schedule=constant"]
# disc_start=0: one compiled step program per run (from disc_start on, the trainer compiles a
# second program, the full step); tests/test_reliability.py's runs set disc_start=1 and cross
# it. perceptual_weight=0: LPIPS's VGG16 in the loss costs most of the step's compile time (the
# held-out metrics still report LPIPS; tests/test_configs.py steps the recipes that use it).
# lr_schedule=constant: demo.py's cosine schedule puts num_train_steps into the compiled step as
# a constant, so runs of different lengths (the fault tests' 5, 7 and 1,000 steps against their
# fixture's 4) would each compile the step again instead of reading it from the cache.


def make_folder(root: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (48 + 8 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "dogs" / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    return root


@pytest.mark.start_early
def test_main_on_tfds_mock_imagenet(tmp_path, one_device):
    import tensorflow_datasets as tfds
    from conftest import load_config, shrink
    from vqgan_jax.trainers import tokenizer

    config = shrink(load_config("imagenet_f16"))
    config.update(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                  num_eval_images=2, eval_every_steps=100)  # one save (data state included)
    config.loss.perceptual_weight = 0.0  # the data path is under test, not LPIPS (see TINY)
    # In-process on one device (conftest.one_device): the tfds data path is under test, not the
    # mesh (tests/test_sharding.py tests the meshes).
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


def test_console_hides_other_libraries_info_and_draws_a_bar_on_a_terminal():
    """console.quiet_logs's filter keeps vqgan_jax's INFO and every warning, drops orbax's INFO;
    Progress draws one tqdm bar (step, loss, img/s) on a terminal and logs nothing."""
    import io
    import logging
    from vqgan_jax import console

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", (), None)

    keep = console._OwnInfoOnly().filter
    assert keep(record(console.__file__, logging.INFO))
    assert not keep(record("/site-packages/orbax/checkpoint/handler.py", logging.INFO))
    assert keep(record("/site-packages/orbax/checkpoint/handler.py", logging.WARNING))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    progress = console.Progress(0, 4, stream=out)
    for step in (1, 2):
        progress.step()
    progress.log(2, {"loss": 0.125, "img_per_s": 10.0})
    progress.step()
    progress.close()
    assert "3/4" in out.getvalue() and "loss 0.1250, 10.0 img/s" in out.getvalue()
    # Evaluation and sampling batches: a bar on a terminal, nothing (the same items) elsewhere.
    out = Terminal()
    assert list(console.bar(iter(range(3)), 3, "evaluate", stream=out)) == [0, 1, 2]
    assert "evaluate" in out.getvalue() and "3/3" in out.getvalue()
    items = iter(range(3))
    assert console.bar(items, 3, "evaluate", stream=io.StringIO()) is items
    assert console.bar(items, 3, "evaluate", process_index=1, stream=Terminal()) is items
