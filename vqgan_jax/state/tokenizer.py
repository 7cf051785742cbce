"""Stage 1's config check, train state and how a run starts it: the trainer steps it, and
converted workdirs (:mod:`vqgan_jax.interop`) pass the same checks and :func:`init_state`."""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqgan_jax import config_base, losses
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


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail fast, before any compile, with the offending field named.

    Raises:
      ValueError: on any field that cannot work, e.g. an unknown ``config.arch``,
        ``config.disc.kind``, ``config.loss.disc_loss`` or ``config.loss.gen_loss`` (the
        message names the field and the valid choices); and as :func:`config_base.check_config`.
    """
    config_base.check_config(config, num_devices, registry.DTYPES)
    m = config.model
    arch = config.get("arch", "vqgan")
    if arch not in registry.ARCHS:
        raise ValueError(f"config.arch={arch!r}; use one of {sorted(registry.ARCHS)}.")
    disc_kind = config.disc.get("kind", "patchgan")
    if disc_kind not in registry.DISCS:
        raise ValueError(f"config.disc.kind={disc_kind!r}; use one of {sorted(registry.DISCS)}.")
    o = config.optimizer
    if o.get("lr_schedule", "constant") not in ("constant", "cosine"):
        raise ValueError(f"config.optimizer.lr_schedule={o.lr_schedule!r}; use 'constant' or "
                         "'cosine'.")
    warmup, final = o.get("warmup_steps", 0), o.get("final_lr_fraction", 0.0)
    if not (warmup >= 0 and 0 <= final <= 1):
        raise ValueError(f"config.optimizer.warmup_steps={warmup} must be >= 0 and "
                         f"final_lr_fraction={final} in [0, 1].")
    if arch == "vqgan":
        f = 2 ** (len(m.ch_mult) - 1)
        if config.image_size % f:
            raise ValueError(f"config.image_size={config.image_size} is not divisible by the "
                             f"downsampling factor {f} of config.model.ch_mult={tuple(m.ch_mult)}.")
        reached = {config.image_size // 2 ** i for i in range(len(m.ch_mult))}
        for r in m.attn_resolutions:
            if r not in reached:
                raise ValueError(f"config.model.attn_resolutions contains {r}, a resolution "
                                 "the encoder never reaches (it visits "
                                 f"{sorted(reached, reverse=True)}).")
        for c in {m.ch * k for k in m.ch_mult}:
            if c % m.norm_groups:
                raise ValueError(f"config.model.norm_groups={m.norm_groups} does not divide {c} "
                                 "channels; choose ch and ch_mult so every level is a multiple.")
    else:
        if config.image_size % m.patch_size:
            raise ValueError(f"config.image_size={config.image_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}.")
        for part in ("enc", "dec"):
            if m[f"{part}_width"] % m[f"{part}_heads"]:
                raise ValueError(f"config.model.{part}_width={m[f'{part}_width']} is not divisible "
                                 f"by config.model.{part}_heads={m[f'{part}_heads']}.")
    if m.n_embed < 2:
        raise ValueError(f"config.model.n_embed={m.n_embed}; a codebook needs at least 2 codes.")
    quantizers.quantizer_spec(config.get("quantizer")).make(  # config.quantizer vs config.model
        m.n_embed, m.embed_dim, l2_normalize=m.get("l2_normalize_codes", False))
    if disc_kind == "stylegan":
        size = config.image_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"config.image_size={size}: the StyleGAN discriminator "
                             "(config.disc.kind='stylegan') needs a power of two >= 8.")
        group = min(config.disc.mbstd_group_size, config.batch_size)
        if config.batch_size % group:
            raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                             f"config.disc.mbstd_group_size={config.disc.mbstd_group_size}.")
    loss = config.loss
    if loss.get("gen_loss", "hinge") not in losses.G_LOSSES:
        raise ValueError(f"config.loss.gen_loss={loss.gen_loss!r}; use one of "
                         f"{sorted(losses.G_LOSSES)}.")
    if loss.get("r1_every", 1) < 1:
        raise ValueError(f"config.loss.r1_every={loss.r1_every} must be >= 1 (R1 is applied on "
                         "steps divisible by it).")
    for field in ("ema_decay", "lecam_ema_decay"):
        if not 0.0 <= loss.get(field, 0.0) < 1.0:
            raise ValueError(f"config.loss.{field}={loss[field]} must be in [0, 1).")
    if config.loss.perceptual_weight > 0 and config.image_size < 32:
        raise ValueError(f"config.image_size={config.image_size}: LPIPS (VGG16, four 2x poolings) "
                         "needs at least 32 pixels; use larger images or "
                         "config.loss.perceptual_weight=0.")
    if config.loss.disc_loss not in losses.D_LOSSES:
        raise ValueError(f"config.loss.disc_loss={config.loss.disc_loss!r}; use one of "
                         f"{sorted(losses.D_LOSSES)}.")


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
