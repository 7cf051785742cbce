"""Speed of the stage-1 train step on whatever devices JAX sees.

    python benchmarks/train_step.py --config=configs/imagenet_f16.py --batch_size=8 --steps=20
    python benchmarks/train_step.py --config=configs/imagenet_f16.py --batch_size=1 --steps=0

Compiles the step for the config (random images of config.image_size), reads XLA's cost
analysis of the compiled program, then times ``--steps`` steps after one warm-up step.
``--steps=0`` compiles and counts only. ``--variant=fused`` (default) is the full step, the
adversarial terms on; ``--variant=before_disc_start`` the generator-only step a run uses until
``config.loss.disc_start`` (the demo's whole run); ``--variant=reference`` the unfused way of
computing the full step's gradients (taming's: three backward passes through the generator),
so the fused step's saving is a ratio taken on the same machine. The XLA flags in force
(``xla_flags``) are in the JSON.

The last line printed is a JSON object: ``img_per_s``, ``step_ms``, ``tflop_per_image``
(XLA's cost analysis of the step as traced, before optimisation, per image:
:func:`stage1_step.hlo_flops`; ``flops_source`` says "compiled" where a backend gives no such
count), ``compiled_tflop_per_image`` (XLA's count for the compiled program: on a GPU it leaves
out the convolutions run by cuDNN), ``achieved_tflops`` and its alias ``tflops``,
``mfu``, ``peak_tflops``, ``dtype``, ``compile_s``, ``batch_size``, ``variant``, ``device``,
``num_devices``, ``mesh``, ``xla_flags``, ``memory`` (the compiled step's per-device bytes,
:func:`vqgan_jax.trainers.loop.compile_stats`).

MFU (model FLOPs utilisation) = FLOPs per device per second / the device's peak, with the
FLOPs of the whole traced step (the global batch) divided by the device count, and the peak from
:data:`PEAK_TFLOPS`: dense (no 2:4 sparsity) tensor-core peaks; for ``--dtype=float32``
the TF32 peak of GPUs (XLA runs float32 matmuls and convolutions in TF32 on A100/H100 unless
``jax_default_matmul_precision=highest``) and the bf16 peak of TPUs (default precision passes
float32 through the MXU in bf16). Unknown devices (e.g. CPU) get ``mfu: null``.
"""

import functools
import json
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import stage1_step
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T

_CONFIG = config_flags.DEFINE_config_file("config", "configs/imagenet_f16.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps; 0 compiles and counts only.")
_VARIANT = flags.DEFINE_enum(
    "variant", "fused", ["fused", "before_disc_start", "reference"],
    "fused: the training step (adversarial terms on); before_disc_start: the generator-only "
    "step a run uses before config.loss.disc_start; reference: taming's unfused gradients.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: the config's); parameters stay float32.")

# Dense peak TFLOP/s per device, by jax's device_kind (prefix match) and compute dtype.
PEAK_TFLOPS = {
    "NVIDIA H100": {"bfloat16": 989.4, "float32": 494.7},     # SXM; tf32 for float32
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA A100": {"bfloat16": 312.0, "float32": 156.0},     # tf32 for float32
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},     # v5e
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},          # v5p reports "TPU v5"
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The per-device dense peak for ``dtype`` (TFLOP/s), or None for an unknown device."""
    for kind in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_kind.startswith(kind):
            return PEAK_TFLOPS[kind][dtype]
    return None


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
    if _DTYPE.value is not None:
        config.dtype = _DTYPE.value
    s = stage1_step.setup(config)  # the full step: adversarial terms on
    if _VARIANT.value != "reference":
        step = stage1_step.full_step(s, adversarial=_VARIANT.value == "fused")
    else:
        step = jax.jit(functools.partial(reference_step, sc=s.sc), donate_argnums=0)
    state, batch, lpips_params, size = s.state, s.batch, s.lpips_params, config.image_size

    t0 = time.perf_counter()
    compiled = stage1_step.compile_step(s, step, f"{_VARIANT.value} step")
    compile_s = time.perf_counter() - t0
    stats = loop.compile_stats(compiled)
    compiled_flops = stats["flops"] * jax.device_count()  # the cost analysis is per device
    traced_flops = stage1_step.hlo_flops(s, step)
    flops = traced_flops or compiled_flops
    device = jax.devices()[0].device_kind
    peak = peak_tflops(device, config.dtype)
    result = dict(variant=_VARIANT.value, batch_size=config.batch_size, image_size=size,
                  dtype=config.dtype, device=device, num_devices=jax.device_count(),
                  mesh=dict(s.mesh.shape), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  compile_s=round(compile_s, 2),
                  tflop_per_image=flops / config.batch_size / 1e12,
                  flops_source="traced" if traced_flops else "compiled",
                  compiled_tflop_per_image=compiled_flops / config.batch_size / 1e12,
                  memory={k: stats[k] for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                                "temp_bytes", "generated_code_bytes")},
                  peak_tflops=peak, step_ms=None, img_per_s=None, achieved_tflops=None,
                  tflops=None, mfu=None,
                  mfu_note=None if peak else f"no peak FLOP/s known for {device!r}: MFU not given")
    if _STEPS.value > 0:
        seconds, state = stage1_step.time_steps(
            lambda state: compiled(state, batch, lpips_params), state, _STEPS.value)
        tflops = flops / seconds / 1e12
        result.update(step_ms=1e3 * seconds, img_per_s=config.batch_size / seconds,
                      achieved_tflops=tflops, tflops=tflops,
                      mfu=tflops / jax.device_count() / peak if peak else None)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
