"""Every config file loads, has the fields users override, and trains one real step at tiny size.

Stage-1 (tokenizer) configs are tested here; stage-2 (transformer) configs in
tests/test_transformer.py, which needs a stage-1 workdir.
"""

import functools
import importlib

import jax
import numpy as np
import pytest

from conftest import CONFIG_DIR, load_config, shrink
from vqgan_jax import main, parallel
from vqgan_jax.models.lpips import load_lpips_params
from vqgan_jax.state import tokenizer as state1
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T

ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
CONFIGS = [n for n in ALL_CONFIGS if load_config(n).stage == "tokenizer"]


def _tiny_form(name: str) -> str:
    """configs/<name>.py after ``shrink``, as comparable text."""
    return repr(sorted(shrink(load_config(name)).to_dict().items()))


def _distinct_at_tiny_size(names: list[str]) -> list[str]:
    """The configs whose shrunk form differs from every earlier one's: a recipe that differs
    only in what ``shrink`` overrides (imagenet_f16_16384: n_embed) would step the very same
    program again."""
    kept, seen = [], set()
    for name in names:
        key = _tiny_form(name)
        if key not in seen:
            kept.append(name)
            seen.add(key)
    return kept


STEP_CONFIGS = _distinct_at_tiny_size(CONFIGS)


def test_the_configs_we_document_exist_and_every_stage_is_known():
    assert {"demo", "imagenet_f16", "imagenet_f16_16384"} <= set(CONFIGS)
    assert {"demo_transformer", "imagenet_cond_transformer"} <= set(ALL_CONFIGS)
    for name in ALL_CONFIGS:
        assert load_config(name).stage in main.STAGES, name
    for stage in main.STAGES:  # main runs vqgan_jax.trainers.<stage>.train_and_evaluate
        assert callable(importlib.import_module(f"vqgan_jax.trainers.{stage}").train_and_evaluate)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_consistent_at_full_and_tiny_size(name):
    config = load_config(name)
    for field in ("dataset", "batch_size", "image_size", "num_train_steps"):
        assert field in config, field
    assert config.stage in main.STAGES
    T.validate_config(config, num_devices=1)  # the real recipe is consistent
    T.validate_config(shrink(config), num_devices=1)


def test_every_config_is_stepped_or_shrinks_to_one_that_is():
    assert "imagenet_f16_16384" not in STEP_CONFIGS and "imagenet_f16" in STEP_CONFIGS
    stepped = {_tiny_form(n) for n in STEP_CONFIGS}
    for name in CONFIGS:
        assert _tiny_form(name) in stepped, name


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_config_trains_one_step_at_tiny_size(name):
    config = shrink(load_config(name))
    T.validate_config(config, num_devices=1)
    sc = state1.build_step_config(config)
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    state, shardings = loop.create_sharded_state(
        functools.partial(state1.init_state, sc=sc, image_size=config.image_size),
        jax.random.key(0), mesh, parallel.rules_from_config(config))
    lpips_params = load_lpips_params()
    step = T.jit_train_step(sc, mesh, shardings, lpips_params)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    state, metrics = step(state, parallel.global_batch({"image": images}, mesh), lpips_params)
    assert int(state.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("field, value, message", [
    ("image_size", 40, "not divisible by the downsampling factor"),
    ("model.attn_resolutions", (7,), "never reaches"),
    ("model.n_embed", 1, "at least 2 codes"),
    ("batch_size", 6, "not divisible by the 4 devices"),
    ("loss.disc_loss", "wasserstein", "config.loss.disc_loss"),
    ("dtype", "float16", "config.dtype"),
    ("optimizer.lr_schedule", "linear", "config.optimizer.lr_schedule"),
    ("optimizer.final_lr_fraction", 2.0, "final_lr_fraction"),
])
def test_bad_config_fails_naming_the_field(field, value, message):
    config = load_config("imagenet_f16")
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        T.validate_config(config, num_devices=4)


def test_cosine_schedule_warms_up_then_decays_to_its_final_fraction():
    config = load_config("imagenet_f16")
    assert state1.learning_rate_schedule(config) == state1.learning_rate(config)  # taming: constant
    config.optimizer.update(lr_schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
    config.num_train_steps = 110
    schedule, peak = state1.learning_rate_schedule(config), state1.learning_rate(config)
    # Linear warmup from peak / 10; then peak * (f + (1 - f) * (1 + cos(pi * t / 100)) / 2).
    expected = {0: peak / 10, 5: peak * 0.55, 10: peak, 60: peak * 0.55, 110: peak * 0.1,
                200: peak * 0.1}
    for step, lr in expected.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12 * peak)
    config.num_train_steps = 4   # a trial run: the warmup is cut to half of it
    schedule = state1.learning_rate_schedule(config)
    for step, lr in {0: peak / 2, 1: peak * 0.75, 2: peak, 3: peak * 0.55, 4: peak * 0.1}.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12 * peak)


def test_training_code_imports_and_logs_without_tensorflow(tmp_path):
    """With tensorflow made unimportable, the trainer imports and writes TensorBoard events."""
    import subprocess
    import sys
    code = f"""
import importlib.abc, sys
class NoTensorflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("tensorflow blocked by the test")
sys.meta_path.insert(0, NoTensorflow())
import vqgan_jax.main, vqgan_jax.trainers.tokenizer, vqgan_jax.trainers.loop as loop
writer = loop.create_writer({str(tmp_path)!r})
writer.write_scalars(1, {{"loss": 0.5}})
writer.flush()
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert list(tmp_path.glob("events.out.tfevents.*"))
