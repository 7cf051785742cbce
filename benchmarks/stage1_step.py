"""The stage-1 train step as the benchmarks build it (no flags: train_step.py and
peer_taming.py import it).

    s = setup(config)                       # state, mesh, random batch, LPIPS weights
    compiled = compile_step(s, full_step(s), "train step")
    state, metrics = compiled(s.state, s.batch, s.lpips_params)   # the state is donated
"""

import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vqgan_jax import parallel
from vqgan_jax.models.lpips import load_lpips_params
from vqgan_jax.state import tokenizer as state1
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T


@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    sc: state1.StepConfig
    mesh: Any
    rules: Any
    state: Any                # TrainState, sharded over mesh
    shardings: Any            # its shardings
    lpips_params: Any         # frozen LPIPS weights, on the mesh
    images: np.ndarray        # float32[B, S, S, 3] in [-1, 1], S = config.image_size
    batch: dict               # {"image": images} as a global jax.Array


def setup(config: ml_collections.ConfigDict, seed: int = 0) -> Setup:
    """Everything the step takes, for ``config`` with the adversarial terms on from step 0
    (sets ``config.loss.disc_start = 0``: the full step is timed)."""
    config.loss.disc_start = 0
    T.validate_config(config, jax.device_count())
    mesh = parallel.mesh_from_config(config)
    rules = parallel.rules_from_config(config)
    sc = state1.build_step_config(config)
    state, shardings = loop.create_sharded_state(
        functools.partial(state1.init_state, sc=sc, image_size=config.image_size),
        jax.random.key(seed), mesh, rules)
    lpips_params = jax.device_put(load_lpips_params(), T.lpips_shardings(mesh, rules))
    size = config.image_size
    images = np.random.default_rng(seed).uniform(-1, 1, (config.batch_size, size, size, 3))
    images = images.astype(np.float32)
    batch = parallel.global_batch({"image": images}, mesh)
    return Setup(config, sc, mesh, rules, state, shardings, lpips_params, images, batch)


def full_step(s: Setup, adversarial: bool = True):
    """vqgan_jax's jitted train step with the discriminator and LPIPS on, or (``adversarial=
    False``) the generator-only step a run uses before ``disc_start``."""
    return T.jit_train_step(s.sc, s.mesh, s.shardings, s.lpips_params, adversarial)


def hlo_flops(s: Setup, step) -> float | None:
    """FLOPs of one whole step (all devices, the global batch) by XLA's cost analysis of the
    program as traced, before XLA optimises it; None where the backend gives none.

    XLA:GPU's count of the *compiled* program leaves out the convolutions it hands to cuDNN
    (custom calls): 0.0101 TFLOP per 256x256 image for imagenet_f16's step on an H200, against
    1.37 TFLOP by XLA:CPU's count. This count sees every convolution on every backend; on a
    CPU it is within 1% of the compiled count (0.011698 vs 0.011770 TFLOP per image, the demo
    step with LPIPS at batch 8).
    """
    with parallel.sharding_context(s.mesh, s.rules):
        lowered = step.lower(s.state, s.batch, s.lpips_params)
    try:
        cost = lowered.cost_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def time_steps(step, state, steps: int) -> tuple[float, Any]:
    """Seconds a step of ``step(state) -> (state, metrics)`` takes, over ``steps`` calls after
    one warm-up call (all waited for), and the state after them."""
    state, metrics = step(state)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / steps, state


def compile_step(s: Setup, step, name: str):
    """``step`` compiled ahead for ``(s.state, s.batch, s.lpips_params)``."""
    return loop.compile_step(step, (s.state, s.batch, s.lpips_params), mesh=s.mesh,
                             rules=s.rules, name=name)
