"""Shared test helpers: config loading and tiny model shapes."""

import atexit
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import pytest

from vqgan_jax import xla_cpu  # its import appends the package's own CPU flag to XLA_FLAGS

# XLA's LLVM backend at -O0 for the whole session, and for the subprocesses that inherit this
# environment (the CLI, notebook and multi-process tests): the tiny test programs compile
# several times faster (one model init: 27 s -> 4.5 s) and run hardly slower. XLA's HLO passes
# and its library kernels (convolutions, dots) are unchanged, and nothing tested here is a
# speed. A value already named in XLA_FLAGS wins. Set before any backend starts: XLA reads
# XLA_FLAGS once.
xla_cpu.add_xla_flag("--xla_backend_optimization_level=0")
# XLA:CPU's older loop emitter for fused elementwise code instead of its MLIR fusion emitters:
# a tiny train step compiles in 5.3-6.1 s instead of 7.2-8.4 s, and the process that builds and
# compiles it takes a quarter less CPU (BENCHMARKS.md, the test suite). Both emit the same
# float32 arithmetic; the tests compare against references with tolerances from the arithmetic
# and compare runs with each other under the same flags.
xla_cpu.add_xla_flag("--xla_cpu_use_fusion_emitters=false")

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
    """The same recipe at a size a CPU test runs in seconds: 32x32 images, 32 channels, one
    level (no downsampling) and attention in the mid-blocks only (a ViT: patch 4, one block of
    width 32 in encoder and decoder). Compiling the train step and the state's init is most of
    a tiny test's time, and it grows with the number of layers, not their size: one level
    instead of two with attention at 16 compiles in about two thirds of the time
    (BENCHMARKS.md, the test suite). Downsampling levels and their attention are tested on
    the models themselves (test_vqgan, test_convert)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.image_size = 32
    config.batch_size = 8
    if config.get("arch", "vqgan") == "vit_vqgan":
        config.model.update(patch_size=4, enc_layers=1, enc_width=32, enc_heads=2, enc_mlp_dim=64,
                            dec_layers=1, dec_width=32, dec_heads=2, dec_mlp_dim=64,
                            embed_dim=8, n_embed=64)
    else:
        config.model.update(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                            z_channels=8, embed_dim=8, n_embed=64)
    config.disc.update(ndf=8, n_layers=2)
    if config.disc.get("kind") == "stylegan":
        config.disc.update(channel_base=256, channel_max=32)
    return config


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """FID Inception-v3 weights with pytorch-fid's state_dict keys and layouts, random values
    that keep activations O(1) through the 94 convolutions (the real file cannot be downloaded
    in tests)."""
    from vqgan_jax.models import inception

    rng = np.random.default_rng(seed)
    shapes = inception.to_state_dict(
        jax.tree.map(lambda a: np.zeros(a.shape, np.float32), inception.abstract_variables()))
    out = {}
    for key, a in shapes.items():
        if key.endswith(("running_var", "bn.weight")):
            out[key] = rng.uniform(0.5, 1.5, a.shape)
        elif a.ndim >= 2:
            out[key] = rng.standard_normal(a.shape) * np.sqrt(2.0 / np.prod(a.shape[1:]))
        else:
            out[key] = 0.1 * rng.standard_normal(a.shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """An .npz of :func:`random_inception_state_dict` (written once a session: ~4 s), shared
    read-only by the sample FID/IS tests."""
    def build(root):
        np.savez(root / "inception.npz", **random_inception_state_dict())
    return str(built_once(tmp_path_factory, "inception_weights", build) / "inception.npz")


@pytest.fixture
def one_device(monkeypatch):
    """The job sees one device instead of conftest's eight simulated ones: ``jax.devices()``,
    ``jax.local_devices()`` and their counts give the first device only, for in-process runs of
    a whole job (its default mesh is every device) whose subject is not the device count: on
    2 CPU cores eight simulated devices make such a run cost more (BENCHMARKS.md, the test
    suite). The multi-device paths have their own tests (test_sharding.py, the 8-vs-1-device
    step, test_multihost.py)."""
    first = jax.devices()[:1]
    for name in ("devices", "local_devices"):
        monkeypatch.setattr(jax, name, lambda *args, **kwargs: list(first))
    for name in ("device_count", "local_device_count"):
        monkeypatch.setattr(jax, name, lambda *args, **kwargs: 1)
    return first[0]


def pytest_collection_modifyitems(items):
    """Tests marked ``start_early`` (a minute or more each) run first: pytest-xdist deals the
    first tests to its workers in turn, so the long ones run side by side from the start and
    the workers finish together, instead of one worker starting a long test near the end."""
    items.sort(key=lambda item: item.get_closest_marker("start_early") is None)  # stable


def built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
    """The folder ``name`` that ``build(folder)`` fills, built once per test session: the
    first pytest-xdist worker to ask builds it while the other waits on a lock, then both use
    it. For costly module and session fixtures (a trained workdir) whose tests the workers
    share. Read-only for its users: copy it to change it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


# ----------------------------------------------------------------------------- stage 2

TINY_GPT = dict(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


@pytest.fixture(scope="session")
def tokenizer_workdir(tmp_path_factory):
    """A stage-1 workdir holding a tiny f2 tokenizer (16 codes; 4x4 codes an 8x8 image), and a
    folder of small images in two classes next to it.

    Written by :func:`write_random_tokenizer` (random weights; tests/test_main.py trains the
    tokenizer end to end).
    """
    from PIL import Image

    def build(root):
        rng = np.random.default_rng(0)
        for label in ("a", "b"):
            (root / "images" / label).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    root / "images" / label / f"{i}.png")
        config = load_config("demo")
        config.update(dataset=f"folder:{root / 'images'}", image_size=8)
        config.loss.perceptual_weight = 0.0  # LPIPS needs 32 pixels; this tokenizer never trains
        config.model.update(ch=8, ch_mult=(1, 2), attn_resolutions=(), z_channels=8,
                            embed_dim=4, n_embed=16, norm_groups=8)
        write_random_tokenizer(root / "run", config, rng)
    return str(built_once(tmp_path_factory, "stage1", build) / "run")


def write_random_tokenizer(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                           rng: np.random.Generator) -> None:
    """A stage-1 workdir at step 1 whose checkpoint holds ``step`` and ``g_params`` only (what
    stage 2, evaluation and the API read), as the trainer lays them out, with random normal
    values (std 0.3) of the right shapes for ``config``: no compile, where training a step
    would cost tens of seconds."""
    import flax.linen as nn
    import jax.numpy as jnp
    from vqgan_jax import workdir as workdir_lib
    from vqgan_jax.models import registry
    from vqgan_jax.trainers import tokenizer as stage1

    stage1.validate_config(config, num_devices=1)
    vq = registry.build_models(config)[0]
    x = jnp.zeros((1, config.image_size, config.image_size, 3))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(vq.init(jax.random.key(0), x)["params"]))
    g_params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), abstract)
    state = dict(step=jnp.ones((), jnp.int32), g_params=g_params)
    workdir_lib.write_state(str(workdir), "workdir", 1, state, config)


def tiny(config: ml_collections.ConfigDict, tokenizer_workdir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    config.update(tokenizer_workdir=tokenizer_workdir, image_size=8, batch_size=8,
                  dataset=f"folder:{os.path.dirname(tokenizer_workdir)}/images", num_classes=2,
                  dtype="float32")
    config.model.update(TINY_GPT)
    config.sample.update(num_per_row=2, max_rows=2, top_k=4, top_p=0.9)
    return config


@pytest.fixture(scope="session")
def gpt_run(tokenizer_workdir, tmp_path_factory):
    """A tiny class-conditional GPT trained 2 steps by the trainer (in-process: 8 devices,
    batch 8): ``(config, workdir, final metrics)``. Shared, so read-only: the resume test
    (tests/test_transformer.py) continues a copy; the FID and API tests sample from it."""
    from vqgan_jax.trainers import transformer as T

    config = tiny(load_config("demo_transformer"), tokenizer_workdir)
    config.update(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=1, pkeep=0.9,
                  class_drop_prob=0.5)
    workdir = built_once(tmp_path_factory, "gpt_run",
                         lambda root: T.train_and_evaluate(config, str(root / "gpt"))) / "gpt"
    return config, workdir, json.loads((workdir / "metrics.json").read_text())


def tiny_maskgit(config: ml_collections.ConfigDict, tokenizer_workdir: str
                 ) -> ml_collections.ConfigDict:
    """A MaskGIT ``config`` over the tiny tokenizer: 8x8 images -> 4x4 codes of 16, two classes,
    one block of width 32."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.update(tokenizer_workdir=tokenizer_workdir, image_size=8, batch_size=8,
                  dataset=f"folder:{os.path.dirname(tokenizer_workdir)}/images", num_classes=2,
                  dtype="float32")
    config.model.update(n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    config.sample.update(num_per_row=2, max_rows=2)
    return config


# maskgit_run's config.sample: guided and scheduled, so samples.png tests the trainer's reading
# of every setting; the sampling tests use the same (their programs compile once).
MASKGIT_SAMPLE = dict(num_steps=4, top_k=4, temperature=1.0, choice_temperature=1.0,
                      guidance_scale=2.0, guidance_schedule="interval",
                      guidance_interval=(0.25, 0.75))


@pytest.fixture(scope="session")
def maskgit_run(tokenizer_workdir, tmp_path_factory):
    """A tiny class-conditional MaskGIT (configs/demo_maskgit.py at tiny_maskgit's size) trained
    2 steps by the trainer (in-process: 8 devices, batch 8), checkpoints at steps 1 and 2,
    samples.png written with :data:`MASKGIT_SAMPLE`: ``(config, workdir, final metrics)``. Shared, so read-only: the resume
    test (tests/test_maskgit.py) continues a copy; the sampling, API, CLI and FID/IS tests read
    it (evaluate_samples adds its eval.json)."""
    from vqgan_jax.trainers import maskgit as T

    config = tiny_maskgit(load_config("demo_maskgit"), tokenizer_workdir)
    config.update(num_train_steps=2, log_every_steps=1, checkpoint_every_steps=1,
                  class_drop_prob=0.5)
    config.sample.update(MASKGIT_SAMPLE)
    workdir = built_once(tmp_path_factory, "maskgit_run",
                         lambda root: T.train_and_evaluate(config, str(root / "maskgit"))) / "maskgit"
    return config, workdir, json.loads((workdir / "metrics.json").read_text())
