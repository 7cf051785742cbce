"""Stage 2's config check and train state (the GPT, its optimizer, the frozen tokenizers it
reads): the trainer steps it; converted workdirs, sampling and evaluation use the same."""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqgan_jax import config_base, parallel, workdir as workdir_lib
from vqgan_jax.models import registry


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; created sharded, donated to the step."""
    step: jax.Array                 # int32[], steps done
    params: Any                     # GPT params (float32)
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) pieces of a train step."""
    gpt: registry.GPT
    vq: registry.Tokenizer            # the frozen tokenizer (conv VQGAN or ViT-VQGAN)
    cond_vq: registry.Tokenizer | None  # the frozen cond-stage tokenizer (image mode)
    conditioning: registry.Conditioning
    tx: optax.GradientTransformation
    grid: tuple[int, int]           # code grid of one training crop
    cond_image_size: int
    class_drop_prob: float
    pkeep: float
    seed: int


def frozen_tokenizer(workdir: str, field: str) -> registry.Tokenizer:
    """The model (no weights) of the stage-1 workdir that ``field`` names."""
    return registry.build_models(workdir_lib.read_config(workdir, field, stage="tokenizer"))[0]


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail fast, before any compile, with the offending field named.

    Reads the tokenizers' saved configs (cheap JSON reads).

    Raises:
      ValueError: on any field that cannot work, e.g. a tokenizer workdir with no checkpoint
        (saying what to run first), a block_size too short for prefix + codes, or a batch the
        devices cannot split (:func:`config_base.check_config`).
    """
    config_base.check_config(config, num_devices, registry.DTYPES)
    if config.conditioning not in registry.CONDITIONINGS:
        raise ValueError(f"config.conditioning={config.conditioning!r}; use one of "
                         f"{registry.CONDITIONINGS}.")
    m = config.model
    if m.n_embd % m.n_head:
        raise ValueError(f"config.model.n_embd={m.n_embd} is not divisible by "
                         f"config.model.n_head={m.n_head}.")
    if not 0 < config.pkeep <= 1:
        raise ValueError(f"config.pkeep={config.pkeep} must be in (0, 1].")
    if not 0 <= config.class_drop_prob < 1:
        raise ValueError(f"config.class_drop_prob={config.class_drop_prob} must be in [0, 1).")
    if config.conditioning == "class" and config.num_classes < 1:
        raise ValueError(f"config.num_classes={config.num_classes}; class conditioning needs "
                         "at least one class.")
    if not config.tokenizer_workdir:
        raise ValueError("config.tokenizer_workdir is empty; set it to a stage-1 workdir (e.g. "
                         "runs/demo, made by `make demo`).")
    vq = frozen_tokenizer(config.tokenizer_workdir, "config.tokenizer_workdir")
    f = vq.downsample_factor
    if config.image_size % f:
        raise ValueError(f"config.image_size={config.image_size} is not divisible by the "
                         f"tokenizer's downsampling factor {f}.")
    num_codes = (config.image_size // f) ** 2
    prefix = 1
    if config.conditioning == "image":
        if not config.cond_tokenizer_workdir:
            raise ValueError("config.cond_tokenizer_workdir is empty; image conditioning needs "
                             "a stage-1 workdir for the cond-stage tokenizer.")
        cond = frozen_tokenizer(config.cond_tokenizer_workdir, "config.cond_tokenizer_workdir")
        fc = cond.downsample_factor
        if config.cond_image_size % fc or config.cond_image_size > config.image_size:
            raise ValueError(f"config.cond_image_size={config.cond_image_size} must be a "
                             f"multiple of the cond-stage tokenizer's factor {fc} and at most "
                             f"config.image_size={config.image_size}.")
        prefix = (config.cond_image_size // fc) ** 2
    if m.block_size < prefix + num_codes - 1:
        raise ValueError(
            f"config.model.block_size={m.block_size} is shorter than the {prefix} prefix "
            f"tokens + {num_codes} codes ({config.image_size // f}x{config.image_size // f} "
            f"grid) - 1 the GPT reads; use block_size >= {prefix + num_codes - 1}.")


def decay_kernels_only(params: Any) -> Any:
    """The weight-decay mask of minGPT (and MaskGIT): True on the Dense kernels only, not on
    biases, LayerNorms or embeddings. Boxed parameters (``nn.LogicallyPartitioned``, as
    ``init_state(boxed=True)`` makes them) are leaves here."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def build_step_config(config: ml_collections.ConfigDict) -> StepConfig:
    """The models, optimizer and conditioning that ``config`` and its tokenizers describe.

    Reads the tokenizers' configs from their workdirs (``config.tokenizer_workdir`` and, in
    image mode, ``config.cond_tokenizer_workdir``); loads no parameters.
    """
    vq = frozen_tokenizer(config.tokenizer_workdir, "config.tokenizer_workdir")
    cond_vq = (frozen_tokenizer(config.cond_tokenizer_workdir, "config.cond_tokenizer_workdir")
               if config.conditioning == "image" else None)
    gpt, conditioning = registry.build_transformer(config, vq, cond_vq)
    side = config.image_size // vq.downsample_factor
    o = config.optimizer
    tx = optax.adamw(o.base_learning_rate * config.batch_size, b1=o.b1, b2=o.b2,
                     weight_decay=o.weight_decay, mask=decay_kernels_only)
    return StepConfig(gpt=gpt, vq=vq, cond_vq=cond_vq, conditioning=conditioning, tx=tx,
                      grid=(side, side), cond_image_size=config.cond_image_size,
                      class_drop_prob=config.class_drop_prob, pkeep=config.pkeep,
                      seed=config.seed)


def init_state(rng: jax.Array, sc: StepConfig, boxed: bool = False) -> TrainState:
    """Fresh GPT parameters and AdamW state (float32), unboxed from their logical axes.

    ``boxed=True`` keeps the ``nn.LogicallyPartitioned`` boxes (see
    :func:`vqgan_jax.trainers.loop.create_sharded_state`).
    """
    tokens = jnp.zeros((1, sc.gpt.block_size), jnp.int32)
    params = sc.gpt.init(rng, tokens)["params"]
    if not boxed:
        params = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=sc.tx.init(params))


def load_frozen(config: ml_collections.ConfigDict, sc: StepConfig, mesh) -> tuple[dict, dict]:
    """The tokenizers' generator parameters from their workdirs' latest checkpoints, on ``mesh``.

    Only the generator weights are read (orbax partial restore): ``state.g_ema_params`` if the
    tokenizer run kept a generator EMA (its saved ``config.loss.ema_decay > 0``), else
    ``state.g_params`` (:func:`vqgan_jax.models.registry.eval_params_field`); laid out by
    :func:`parallel.state_shardings` with ``config.sharding_rules``.

    Returns:
      ``(frozen, shardings)``: ``{"tokenizer": params[, "cond_tokenizer": params]}``.
    """
    frozen, shardings = {}, {}
    pairs = [("tokenizer", sc.vq, config.tokenizer_workdir, "config.tokenizer_workdir")]
    if getattr(sc, "cond_vq", None) is not None:  # (stage 2's MaskGIT StepConfig has none)
        pairs.append(("cond_tokenizer", sc.cond_vq, config.cond_tokenizer_workdir,
                      "config.cond_tokenizer_workdir"))
    for name, vq, workdir, field in pairs:
        frozen[name], shardings[name] = workdir_lib.restore_eval_params(
            workdir, field, workdir_lib.read_config(workdir, field, stage="tokenizer"), vq, mesh,
            parallel.rules_from_config(config))
    return frozen, shardings


def load_for_sampling(workdir: str, mesh=None, step: int | None = None, field: str = "--workdir"
                      ) -> tuple[Any, dict, StepConfig, ml_collections.ConfigDict]:
    """A stage-2 workdir's GPT parameters (newest intact checkpoint, or ``step``), its frozen
    tokenizers (their newest) and its config, laid out on ``mesh`` (default: one device).

    Raises:
      ValueError: naming ``field`` when ``workdir`` holds no stage-2 checkpoint (or ``step``
        when there is no such checkpoint).
    """
    return restore_for_sampling(workdir, mesh, step, field, "transformer", build_step_config,
                                init_state)


def restore_for_sampling(workdir: str, mesh, step: int | None, field: str, stage: str,
                         build_step_config: Any, init_state: Any
                         ) -> tuple[Any, dict, Any, ml_collections.ConfigDict]:
    """What both stage-2 kinds' ``load_for_sampling`` do, given the ``stage`` the workdir must
    hold and that stage's ``build_step_config(config)`` and ``init_state(rng, sc, boxed)``:
    the params subtree of the newest intact checkpoint (or ``step``) laid out by the config's
    sharding rules on ``mesh`` (default: one device), and the frozen tokenizer(s).

    Raises:
      ValueError: naming ``field`` (no checkpoint, another stage) or ``step`` (no such one).
    """
    workdir = workdir_lib.absolute(workdir)
    config = workdir_lib.read_config(workdir, field, step, stage=stage)
    mesh = mesh or parallel.create_mesh(devices=jax.devices()[:1])
    sc = build_step_config(config)
    boxed = jax.eval_shape(functools.partial(init_state, sc=sc, boxed=True),
                           jax.random.key(0)).params
    shardings = parallel.state_shardings(boxed, mesh, parallel.rules_from_config(config))
    params = workdir_lib.restore_subtree(workdir, field, "params", workdir_lib.abstract_like(
        parallel.unbox(boxed), shardings), step)
    frozen, _ = load_frozen(config, sc, mesh)
    return params, frozen, sc, config
