"""Shared test helpers: config loading and tiny model shapes."""

import atexit
import importlib.util
import os
import pathlib
import shutil
import tempfile

import jax
import ml_collections

# Eight simulated CPU devices for the sharding tests; single-device tests use jax.devices()[:1].
jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache for the session, inherited by the `python -m vqgan_jax.main`
# subprocesses: restarted jobs (resume, preemption tests) load the step they compiled before
# instead of compiling it again. A hit loads the same executable, so results are unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="vqgan_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def load_config(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of configs/<name>.py."""
    path = CONFIG_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same recipe at a size a CPU test runs in seconds: 32x32 images, 32 channels."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.image_size = 32
    config.batch_size = 8
    config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                        z_channels=8, embed_dim=8, n_embed=64)
    config.disc.update(ndf=8, n_layers=2)
    return config
