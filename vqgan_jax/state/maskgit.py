"""Stage 2 by masked-token generation (Chang et al. 2022, "MaskGIT"): the config check and the
train state (the MaskGIT transformer, its optimizer, the frozen tokenizer it reads). The trainer
(:mod:`vqgan_jax.trainers.maskgit`) steps it; the sampler and the public API load a trained
workdir with :func:`load_for_sampling`.

The train state is stage 2's :class:`vqgan_jax.state.transformer.TrainState` (step, params,
opt_state), the tokenizer is restored by :func:`vqgan_jax.state.transformer.load_frozen`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqgan_jax import config_base
from vqgan_jax.models import registry
from vqgan_jax.models.maskgit import MaskGIT
from vqgan_jax.state import transformer as state_transformer
from vqgan_jax.state.transformer import TrainState, decay_kernels_only, frozen_tokenizer

__all__ = ["CONDITIONINGS", "StepConfig", "TrainState", "build_step_config", "init_state",
           "load_for_sampling", "load_frozen", "validate_config"]

CONDITIONINGS = ("class", "unconditional")  # config.conditioning of a MaskGIT run


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) pieces of a MaskGIT train step.

    Attributes:
      model: the :class:`MaskGIT` (``vocab_size`` = the tokenizer's n_embed, ``seq_len`` =
        h * w of ``grid``, ``num_classes`` = 0 when unconditional).
      vq: the frozen tokenizer (conv VQGAN or ViT-VQGAN); its weights are ``frozen["tokenizer"]``.
      tx: AdamW.
      grid: ``(h, w)`` code grid of one training crop (``image_size / f`` each).
      num_classes: class ids in ``[0, num_classes)`` (class mode); 0 when unconditional.
      class_drop_prob: chance a training label becomes the null class, in ``[0, 1)``.
      label_smoothing: of the masked-code cross-entropy, in ``[0, 1)``.
      seed: the step's RNG is ``fold_in(key(seed), step)``.
    """
    model: MaskGIT
    vq: registry.Tokenizer
    tx: optax.GradientTransformation
    grid: tuple[int, int]
    num_classes: int
    class_drop_prob: float
    label_smoothing: float
    seed: int


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail fast, before any compile, with the offending field named.

    Reads the tokenizer's saved config (a cheap JSON read).

    Raises:
      ValueError: on any field that cannot work: the shared checks of
        :func:`config_base.check_config` (dtype, a batch the devices split, step counts); a
        ``config.conditioning`` other than class / unconditional (image conditioning is the
        GPT's); ``num_classes < 1`` in class mode; ``class_drop_prob`` or ``label_smoothing``
        outside ``[0, 1)``; ``model.n_embd`` not divisible by ``model.n_head``; an empty or
        untrained ``tokenizer_workdir`` or one that is not stage 1; an ``image_size`` the
        tokenizer's downsampling factor does not divide.
    """
    config_base.check_config(config, num_devices, registry.DTYPES)
    if config.conditioning == "image":
        raise ValueError("config.conditioning='image': MaskGIT here reads one class (or null) "
                         "token before the codes; use 'class' or 'unconditional', or train a "
                         "GPT (configs/*_transformer.py) for image conditioning.")
    if config.conditioning not in CONDITIONINGS:
        raise ValueError(f"config.conditioning={config.conditioning!r}; use one of "
                         f"{CONDITIONINGS}.")
    if config.conditioning == "class" and config.num_classes < 1:
        raise ValueError(f"config.num_classes={config.num_classes}; class conditioning needs "
                         "at least one class (or set config.conditioning='unconditional').")
    if not 0 <= config.class_drop_prob < 1:
        raise ValueError(f"config.class_drop_prob={config.class_drop_prob} must be in [0, 1).")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1) "
                         "(MaskGIT used 0.1).")
    m = config.model
    if m.n_embd % m.n_head:
        raise ValueError(f"config.model.n_embd={m.n_embd} is not divisible by "
                         f"config.model.n_head={m.n_head}.")
    if not config.tokenizer_workdir:
        raise ValueError("config.tokenizer_workdir is empty; set it to a stage-1 workdir (e.g. "
                         "runs/demo, made by `make demo`).")
    vq = frozen_tokenizer(config.tokenizer_workdir, "config.tokenizer_workdir")
    f = vq.downsample_factor
    if config.image_size % f:
        raise ValueError(f"config.image_size={config.image_size} is not divisible by the "
                         f"tokenizer's downsampling factor {f}.")


def build_step_config(config: ml_collections.ConfigDict) -> StepConfig:
    """The MaskGIT, optimizer and tokenizer that ``config`` describes.

    Reads the tokenizer's config from ``config.tokenizer_workdir``; loads no parameters. The
    optimizer is AdamW with lr ``base_learning_rate * batch_size`` (constant), ``b1``, ``b2``
    and ``weight_decay`` of ``config.optimizer``, decay on the Dense kernels only
    (:func:`vqgan_jax.state.transformer.decay_kernels_only`).
    """
    vq = frozen_tokenizer(config.tokenizer_workdir, "config.tokenizer_workdir")
    model = registry.build_maskgit(config, vq)
    side = config.image_size // vq.downsample_factor
    o = config.optimizer
    tx = optax.adamw(o.base_learning_rate * config.batch_size, b1=o.b1, b2=o.b2,
                     weight_decay=o.weight_decay, mask=decay_kernels_only)
    return StepConfig(model=model, vq=vq, tx=tx, grid=(side, side),
                      num_classes=model.num_classes, class_drop_prob=config.class_drop_prob,
                      label_smoothing=config.label_smoothing, seed=config.seed)


def init_state(rng: jax.Array, sc: StepConfig, boxed: bool = False) -> TrainState:
    """Fresh MaskGIT parameters and AdamW state (float32), unboxed from their logical axes.

    ``boxed=True`` keeps the ``nn.LogicallyPartitioned`` boxes (see
    :func:`vqgan_jax.trainers.loop.create_sharded_state`).
    """
    codes = jnp.zeros((1, sc.model.seq_len), jnp.int32)
    cond = jnp.full((1,), sc.model.null_token, jnp.int32)
    params = sc.model.init(rng, codes, cond)["params"]
    if not boxed:
        params = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=sc.tx.init(params))


def load_frozen(config: ml_collections.ConfigDict, sc: StepConfig, mesh) -> tuple[dict, dict]:
    """The tokenizer's generator parameters from ``config.tokenizer_workdir``'s latest
    checkpoint, on ``mesh``: :func:`vqgan_jax.state.transformer.load_frozen`.

    Returns:
      ``(frozen, shardings)``: ``{"tokenizer": params}`` and their shardings.
    """
    return state_transformer.load_frozen(config, sc, mesh)


def load_for_sampling(workdir: str, mesh=None, step: int | None = None, field: str = "--workdir"
                      ) -> tuple[Any, dict, StepConfig, ml_collections.ConfigDict]:
    """A MaskGIT workdir's parameters (newest intact checkpoint, or ``step``), its frozen
    tokenizer (the tokenizer workdir's newest) and its config, laid out on ``mesh`` (default:
    one device).

    Returns:
      ``(params, frozen, sc, config)``: the MaskGIT parameters (unboxed, float32), ``frozen =
      {"tokenizer": params}``, the :class:`StepConfig` (``sc.model``, ``sc.vq``, ``sc.grid``)
      and the run's saved config (``config.sample`` holds its sampling defaults).

    Raises:
      ValueError: naming ``field`` when ``workdir`` holds no checkpoint or is not a MaskGIT
        (``stage="maskgit"``) workdir, or ``step`` when there is no such checkpoint.
    """
    return state_transformer.restore_for_sampling(workdir, mesh, step, field, "maskgit",
                                                  build_step_config, init_state)
