"""Training speed against taming-transformers: three loops, one config, one process.

    python benchmarks/peer_taming.py                       # the issue's config, CPU
    python benchmarks/peer_taming.py --device=cuda --torch_dtype=bfloat16 --batch_size=16
    python benchmarks/peer_taming.py --config.model.ch=128 --loops=taming,ours

Times one training step (a generator and a discriminator update, PatchGAN and LPIPS on) of:

* ``taming``: taming's ``VQModel.training_step`` + ``VQLPIPSWithDiscriminator`` in PyTorch as
  PyTorch Lightning runs them with two optimizers (benchmarks/taming_loop.py): the generator
  update (L1 + LPIPS + adaptive-weighted hinge loss + VQ loss, the adaptive weight from two
  ``autograd.grad`` calls), then the discriminator update, for which Lightning calls
  ``training_step`` again, so the generator's forward pass runs twice per batch.
* ``lean``: the same with the generator's output reused by the discriminator update.
* ``ours``: vqgan_jax's jitted step (benchmarks/stage1_step.py), ``disc_start = 0``.

With the default ``--config`` the model is the issue's: configs/imagenet_f16.py with
:data:`PEER` applied (``--config.*`` overrides win over it); both sides are built from the
same config fields. Steps are timed in rounds (taming, lean, ours, taming, ...) after
``--warmup`` steps each, so a drifting machine favours none; each loop reports its median.

The last line is a JSON object: ``taming_img_per_s``, ``lean_img_per_s``, ``ours_img_per_s``
(null for a loop not run), ``ratio_vs_taming`` and ``ratio_vs_lean`` (ours / that loop),
``step_ms`` (median per loop), ``device`` (``torch`` and ``jax`` device), ``threads``,
``xla_flags`` (the XLA_FLAGS in force),
``batch_size``, ``image_size``, ``steps``, ``warmup``, ``torch_dtype``, ``jax_dtype``,
``torch_version``, ``jax_version`` and ``config`` (the model, disc and loss fields used).
"""

import functools
import json
import math
import os
import pathlib
import statistics
import time

import jax
import torch
from absl import app, flags
from ml_collections import config_flags

import stage1_step
import taming_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "imagenet_f16.py")
# The model: imagenet_f16 narrowed for 64x64 images.
PEER = {"model.ch": 64, "model.ch_mult": (1, 2, 2), "model.num_res_blocks": 1,
        "model.attn_resolutions": (16,), "model.z_channels": 64, "model.embed_dim": 64,
        "model.n_embed": 1024, "disc.ndf": 64, "disc.n_layers": 3,
        "loss.perceptual_weight": 1.0, "loss.disc_factor": 1.0, "loss.disc_weight": 0.8}
LOOPS = ("taming", "lean", "ours")

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size of every loop.")
_SIZE = flags.DEFINE_integer("image_size", 64, "Image side, pixels.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per loop.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per loop first.", lower_bound=0)
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads (XLA keeps its own pool).")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "Torch device.")
_TORCH_DTYPE = flags.DEFINE_enum("torch_dtype", "float32", ["float32", "bfloat16"],
                                 "bfloat16: torch autocast (use with --device=cuda).")
_LOOPS = flags.DEFINE_list("loops", list(LOOPS), "Loops to time, of taming,lean,ours.")


def peer_config():
    """The config of the run: the issue's (:data:`PEER`) unless another --config is given;
    command-line ``--config.*`` overrides are kept."""
    config, flag = _CONFIG.value, flags.FLAGS["config"]
    if str(pathlib.Path(config_flags.get_config_filename(flag)).resolve()) == DEFAULT_CONFIG:
        user = config_flags.get_override_values(flag)
        config.update_from_flattened_dict({k: v for k, v in PEER.items() if k not in user})
    config.batch_size, config.image_size = _BATCH.value, _SIZE.value
    return config


def ours_loop(s: stage1_step.Setup):
    """vqgan_jax's compiled full step on ``s.batch``; the state carries over between calls."""
    compiled, state = stage1_step.compile_step(s, stage1_step.full_step(s), "ours"), s.state

    def step():
        nonlocal state
        state, metrics = compiled(state, s.batch, s.lpips_params)
        jax.block_until_ready((state, metrics))
        return metrics["loss"], metrics["d_loss"], metrics["d_weight"]
    return step


def make_loops(config, names):
    """name -> a function running one synchronized step on the same images for every loop
    and returning (loss, d_loss, d_weight)."""
    s = stage1_step.setup(config)
    x = torch.from_numpy(s.images.transpose(0, 3, 1, 2).copy()).to(_DEVICE.value)  # [B,3,H,W]
    loops = {}
    for name in names:
        if name == "ours":
            loops[name] = ours_loop(s)
        else:
            torch_loop = taming_loop.TamingLoop(config, _DEVICE.value, _TORCH_DTYPE.value,
                                                reuse_xrec=name == "lean")
            loops[name] = functools.partial(torch_loop.step, x)
    return loops


def main(argv):
    del argv
    names = [n for n in LOOPS if n in _LOOPS.value]
    if not names or set(_LOOPS.value) - set(LOOPS):
        raise app.UsageError(f"--loops={','.join(_LOOPS.value)}: choose from {LOOPS}.")
    # Before JAX starts its backend: a GPU's memory grows as used, not 75% taken at start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    torch.set_num_threads(_THREADS.value)
    config = peer_config()
    loops = make_loops(config, names)

    def run(name):
        t0 = time.perf_counter()
        out = loops[name]()
        seconds = time.perf_counter() - t0
        out = [float(v) for v in out]
        if not all(map(math.isfinite, out)):
            raise FloatingPointError(f"{name}: non-finite loss, d_loss or d_weight {out}")
        return seconds, out

    for name in names:
        for _ in range(_WARMUP.value):
            run(name)
    times, last = {n: [] for n in names}, {}
    for _ in range(_STEPS.value):  # rounds: each loop once per round
        for name in names:
            seconds, last[name] = run(name)
            times[name].append(seconds)

    b = config.batch_size
    step_ms = {n: 1e3 * statistics.median(times[n]) for n in names}
    img_s = {n: b / (step_ms[n] / 1e3) if n in step_ms else None for n in LOOPS}
    for n in names:
        print(f"{n:7s} {step_ms[n]:9.1f} ms/step (median of {_STEPS.value}) "
              f"{img_s[n]:8.2f} img/s  loss {last[n][0]:.4g}  d_loss {last[n][1]:.4g}  "
              f"d_weight {last[n][2]:.3g}")
    ratio = lambda n: img_s["ours"] / img_s[n] if img_s["ours"] and img_s[n] else None
    fields = {k: functools.reduce(getattr, k.split("."), config)
              for k in (*PEER, "model.norm_groups", "loss.codebook_weight")}
    print(json.dumps(dict(
        **{f"{n}_img_per_s": img_s[n] for n in LOOPS},
        ratio_vs_taming=ratio("taming"), ratio_vs_lean=ratio("lean"), step_ms=step_ms,
        device={"torch": _DEVICE.value, "jax": jax.devices()[0].device_kind,
                "jax_devices": jax.device_count()},
        threads=_THREADS.value, xla_flags=os.environ.get("XLA_FLAGS", ""), batch_size=b,
        image_size=config.image_size,
        steps=_STEPS.value, warmup=_WARMUP.value, torch_dtype=_TORCH_DTYPE.value,
        jax_dtype=config.dtype, torch_version=torch.__version__, jax_version=jax.__version__,
        config={k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})))


if __name__ == "__main__":
    app.run(main)
