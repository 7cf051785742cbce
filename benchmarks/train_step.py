"""Speed of the stage-1 train step on whatever devices JAX sees.

    python benchmarks/train_step.py --config=configs/imagenet_f16.py --batch_size=8 --steps=20
    python benchmarks/train_step.py --config=configs/imagenet_f16.py --batch_size=1 --steps=0

Compiles the step for the config (random images of config.image_size), reads XLA's cost
analysis of the compiled program, then times ``--steps`` steps after one warm-up step.
``--steps=0`` compiles and counts only. ``--variant=reference`` measures the unfused way of
computing the same gradients (taming's: three backward passes through the generator), so the
fused step's saving is a ratio taken on the same machine.

The last line printed is a JSON object: ``img_per_s``, ``step_ms``, ``tflop_per_image``
(XLA's count for the compiled step, per image), ``achieved_tflops``, ``compile_s``, ``batch_size``,
``variant``, ``device``, ``num_devices``.
"""

import functools
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vqgan_jax import parallel
from vqgan_jax.models.lpips import load_lpips_params
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T

_CONFIG = config_flags.DEFINE_config_file("config", "configs/imagenet_f16.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps; 0 compiles and counts only.")
_VARIANT = flags.DEFINE_enum("variant", "fused", ["fused", "reference"],
                             "fused: the training step; reference: taming's unfused gradients.")


def reference_step(state, batch, lpips_params, sc):
    """:func:`tokenizer.reference_grads` plus the same optimizer updates as the train step."""
    import optax
    g_grads, d_grads, d_weight = T.reference_grads(state, batch, lpips_params, sc)
    g_updates, g_opt_state = sc.g_tx.update(g_grads, state.g_opt_state, state.g_params)
    d_updates, d_opt_state = sc.d_tx.update(d_grads, state.d_opt_state, state.d_params)
    return state.replace(step=state.step + 1,
                         g_params=optax.apply_updates(state.g_params, g_updates),
                         d_params=optax.apply_updates(state.d_params, d_updates),
                         g_opt_state=g_opt_state, d_opt_state=d_opt_state), {"d_weight": d_weight}


def main(argv):
    del argv
    config = _CONFIG.value
    if _BATCH.value is not None:
        config.batch_size = _BATCH.value
    config.loss.disc_start = 0  # time the full step, adversarial terms on
    T.validate_config(config, jax.device_count())
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.fsdp)
    sc = T.build_step_config(config)
    state, shardings = loop.create_sharded_state(
        functools.partial(T.init_state, sc=sc, image_size=config.image_size),
        jax.random.key(0), mesh)
    lpips_params = jax.device_put(load_lpips_params(), parallel.replicated(mesh))
    if _VARIANT.value == "fused":
        step = T.jit_train_step(sc, mesh, shardings, lpips_params)
    else:
        step = jax.jit(functools.partial(reference_step, sc=sc), donate_argnums=0)
    size = config.image_size
    images = np.random.default_rng(0).uniform(-1, 1, (config.batch_size, size, size, 3))
    batch = parallel.global_batch({"image": images.astype(np.float32)}, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, lpips_params).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    result = dict(variant=_VARIANT.value, batch_size=config.batch_size, image_size=size,
                  device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
                  compile_s=round(compile_s, 2), tflop_per_image=flops / config.batch_size / 1e12,
                  step_ms=None, img_per_s=None, achieved_tflops=None)
    if _STEPS.value > 0:
        state, metrics = compiled(state, batch, lpips_params)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = compiled(state, batch, lpips_params)
        jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - t0) / _STEPS.value
        result.update(step_ms=1e3 * seconds, img_per_s=config.batch_size / seconds,
                      achieved_tflops=flops / seconds / 1e12)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
