"""Stage 1's train state and how a run starts it: the trainer steps it, and converted workdirs
(:mod:`vqgan_jax.interop`) are made by the same :func:`init_state`."""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqgan_jax.models import quantizers, registry


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; created sharded, donated to the step."""
    step: jax.Array                 # int32[], steps done
    g_params: Any                   # tokenizer params (float32)
    d_params: Any                   # discriminator params (float32)
    d_batch_stats: Any              # BatchNorm running statistics ({} for StyleGAN)
    g_opt_state: optax.OptState
    d_opt_state: optax.OptState
    # The quantizer's training state (models.quantizers.STATS: EMA cluster sizes and sums,
    # steps each code went unused); {} for plain VQ. Inference never reads it.
    quantizer_stats: Any = flax.struct.field(default_factory=dict)
    g_ema_params: Any = None        # EMA of g_params (loss.ema_decay > 0), else None
    lecam_ema: Any = None           # float32[2] LeCAM anchors (mean D(real), mean D(fake)), or None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) pieces of a train step."""
    vq: registry.Tokenizer
    disc: registry.Discriminator
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    disc_start: int
    disc_weight: float
    disc_factor: float
    disc_loss: str
    codebook_weight: float
    perceptual_weight: float
    seed: int
    gen_loss: str
    adaptive_disc_weight: bool
    l1_weight: float
    l2_weight: float
    logit_laplace_weight: float
    r1_weight: float
    r1_every: int
    lecam_weight: float
    lecam_ema_decay: float
    ema_decay: float

    @property
    def dtype(self):
        return self.vq.dtype


def learning_rate(config: ml_collections.ConfigDict) -> float:
    """taming's rule: base_learning_rate * global batch size."""
    return config.optimizer.base_learning_rate * config.batch_size


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """The peak :func:`learning_rate`, constant (taming) or, with ``optimizer.lr_schedule =
    "cosine"``, reached by a linear warmup over ``optimizer.warmup_steps`` from ``peak /
    warmup_steps`` (the first update is not wasted; at most half the run: a short trial run of a
    recipe still decays) and then decayed along a half cosine to
    ``optimizer.final_lr_fraction`` of itself at ``num_train_steps`` (SGDR, Loshchilov & Hutter
    2017, eq. 5 without restarts). Old configs without the field: constant."""
    o, peak = config.optimizer, learning_rate(config)
    if o.lr_schedule == "constant":
        return peak
    warmup = min(o.warmup_steps, config.num_train_steps // 2)
    return optax.warmup_cosine_decay_schedule(
        peak / max(warmup, 1), peak, warmup, config.num_train_steps, peak * o.final_lr_fraction)


def build_step_config(config: ml_collections.ConfigDict) -> StepConfig:
    vq, disc = registry.build_models(config)
    adam = functools.partial(optax.adam, learning_rate_schedule(config), b1=config.optimizer.b1,
                             b2=config.optimizer.b2)
    return StepConfig(vq=vq, disc=disc, g_tx=adam(), d_tx=adam(), seed=config.seed,
                      **config.loss.to_dict())


def init_state(rng: jax.Array, sc: StepConfig, image_size: int, boxed: bool = False
               ) -> TrainState:
    """Fresh parameters and optimizer states (float32), unboxed from their logical axes.

    ``boxed=True`` keeps the ``nn.LogicallyPartitioned`` boxes on the parameters and their
    optimizer states (for :func:`vqgan_jax.trainers.loop.create_sharded_state` to read the
    axis names).
    ``g_ema_params`` starts as a copy of ``g_params`` (when ``ema_decay > 0``), the LeCAM
    anchors at 0 (when ``lecam_weight > 0``); both are None otherwise.
    """
    g_rng, d_rng = jax.random.split(rng)
    # The StyleGAN discriminator's minibatch-stddev groups need as many images as a group.
    batch = getattr(sc.disc, "mbstd_group_size", 1)
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    g_vars = sc.vq.init(g_rng, x[:1])
    d_vars = sc.disc.init(d_rng, x, train=False)
    if not boxed:
        g_vars, d_vars = nn.meta.unbox((g_vars, d_vars))
    g_params = g_vars["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), g_params=g_params,
                      d_params=d_vars["params"], d_batch_stats=d_vars.get("batch_stats", {}),
                      g_opt_state=sc.g_tx.init(g_params),
                      d_opt_state=sc.d_tx.init(d_vars["params"]),
                      quantizer_stats=g_vars.get(quantizers.STATS, {}),
                      g_ema_params=(jax.tree.map(jnp.copy, g_params) if sc.ema_decay > 0
                                    else None),
                      lecam_ema=jnp.zeros((2,), jnp.float32) if sc.lecam_weight > 0 else None)


def init_quantizer_stats(vq: registry.Tokenizer, g_params: Any) -> Any:
    """Fresh :attr:`TrainState.quantizer_stats` for the codebook in ``g_params`` (e.g. one
    converted from taming): EMA sums start at that codebook. ``{}`` for plain VQ."""
    # Any call of the quantizer runs its setup, which declares the statistics while mutable.
    _, variables = vq.apply({"params": g_params},
                            method=lambda m: m.quantize(jnp.zeros((1, m.embed_dim))),
                            mutable=[quantizers.STATS])
    return variables.get(quantizers.STATS, {})


def eval_params(state: TrainState) -> Any:
    """The generator weights to evaluate and sample with: the EMA when kept, else g_params."""
    return state.g_params if state.g_ema_params is None else state.g_ema_params
