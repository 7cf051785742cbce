"""Stage 2: train a GPT over a frozen tokenizer's codes (Esser et al. 2021, sec. 3.2; taming's
``Net2NetTransformer``), and sample images from a workdir.

Codes are made on the fly: each batch of augmented crops from the stage-1 grain pipeline goes
through the frozen tokenizer's encoder inside the jitted step, so every epoch sees new random
crops and flips (a token cache written once would freeze one augmentation per image).

Token layout: codes are ``[0, V)`` (V = the tokenizer's n_embed); conditioning tokens follow
(:class:`Conditioning`). The sequence is ``prefix + codes``; the GPT reads
``(prefix + codes)[:-1]`` and its logits from the last prefix position on predict the codes, so
the loss covers the image codes only.
"""

import dataclasses
import functools
import math
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel, sampling
from vqgan_jax.data import sources
from vqgan_jax.models.gpt import GPT
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as stage1

CONDITIONINGS = ("unconditional", "class", "image")


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The prefix tokens of each conditioning mode (taming's cond stage).

    * ``unconditional``: one start token (sos) ``V``.
    * ``class``: the class token ``V + c`` for ``c`` in ``[0, num_classes)``; ``V + num_classes``
      is the null class of classifier-free guidance.
    * ``image``: the cond-stage tokenizer's codes of the condition image, offset by ``V``.

    Attributes:
      kind: one of :data:`CONDITIONINGS`.
      vocab_size: V, the number of image codes.
      num_classes: class ids (class mode).
      cond_vocab_size: the cond-stage codebook size (image mode).
      cond_grid: the condition's code grid (image mode).
    """
    kind: str
    vocab_size: int
    num_classes: int = 0
    cond_vocab_size: int = 0
    cond_grid: tuple[int, int] = (0, 0)

    @property
    def n_cond_tokens(self) -> int:
        return {"unconditional": 1, "class": self.num_classes + 1,
                "image": self.cond_vocab_size}[self.kind]

    @property
    def prefix_length(self) -> int:
        return math.prod(self.cond_grid) if self.kind == "image" else 1

    def sos_prefix(self, batch_size: int) -> jax.Array:
        """int32[B, 1]: the start token (unconditional mode)."""
        return jnp.full((batch_size, 1), self.vocab_size, jnp.int32)

    def class_prefix(self, class_ids: jax.Array) -> jax.Array:
        """int[B] class ids in [0, num_classes) -> int32[B, 1] class tokens."""
        return (self.vocab_size + jnp.asarray(class_ids, jnp.int32))[:, None]

    def null_prefix(self, batch_size: int) -> jax.Array:
        """int32[B, 1]: the null class token (class mode, classifier-free guidance)."""
        return jnp.full((batch_size, 1), self.vocab_size + self.num_classes, jnp.int32)

    def image_prefix(self, cond_codes: jax.Array) -> jax.Array:
        """int[B, h, w] cond-stage codes -> int32[B, h*w] tokens."""
        return self.vocab_size + cond_codes.reshape(cond_codes.shape[0], -1).astype(jnp.int32)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; created sharded, donated to the step."""
    step: jax.Array                 # int32[], steps done
    params: Any                     # GPT params (float32)
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static (hashable) pieces of a train step."""
    gpt: GPT
    vq: stage1.Tokenizer            # the frozen tokenizer (conv VQGAN or ViT-VQGAN)
    cond_vq: stage1.Tokenizer | None  # the frozen cond-stage tokenizer (image mode)
    conditioning: Conditioning
    tx: optax.GradientTransformation
    grid: tuple[int, int]           # code grid of one training crop
    cond_image_size: int
    class_drop_prob: float
    pkeep: float
    seed: int


DTYPES = stage1.DTYPES


# ----------------------------------------------------------------------------- building

def _tokenizer_config(workdir: str, field: str) -> ml_collections.ConfigDict:
    tok = loop.read_config(workdir, field)
    if tok.get("stage") != "tokenizer":
        raise ValueError(f"{field}={workdir!r} holds a {tok.get('stage')!r} run; point it at a "
                         "stage-1 (tokenizer) workdir.")
    return tok


def _tokenizer(tok: ml_collections.ConfigDict) -> stage1.Tokenizer:
    return stage1.build_models(tok)[0]


def build_step_config(config: ml_collections.ConfigDict) -> StepConfig:
    """The models, optimizer and conditioning that ``config`` and its tokenizers describe.

    Reads the tokenizers' configs from their workdirs (``config.tokenizer_workdir`` and, in
    image mode, ``config.cond_tokenizer_workdir``); loads no parameters.
    """
    vq = _tokenizer(_tokenizer_config(config.tokenizer_workdir, "config.tokenizer_workdir"))
    cond_vq, cond_grid = None, (0, 0)
    if config.conditioning == "image":
        cond_vq = _tokenizer(_tokenizer_config(config.cond_tokenizer_workdir,
                                               "config.cond_tokenizer_workdir"))
        side = config.cond_image_size // cond_vq.downsample_factor
        cond_grid = (side, side)
    conditioning = Conditioning(
        config.conditioning, vq.n_embed, num_classes=config.num_classes,
        cond_vocab_size=cond_vq.n_embed if cond_vq else 0, cond_grid=cond_grid)
    gpt = GPT(vocab_size=vq.n_embed, n_cond_tokens=conditioning.n_cond_tokens,
              dtype=DTYPES[config.dtype], **config.model.to_dict())
    side = config.image_size // vq.downsample_factor
    o = config.optimizer
    # minGPT: decay the Dense kernels only (not biases, LayerNorms, embeddings).
    # (Boxed parameters, as init_state(boxed=True) makes them, are leaves here.)
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    tx = optax.adamw(o.base_learning_rate * config.batch_size, b1=o.b1, b2=o.b2,
                     weight_decay=o.weight_decay, mask=decay_mask)
    return StepConfig(gpt=gpt, vq=vq, cond_vq=cond_vq, conditioning=conditioning, tx=tx,
                      grid=(side, side), cond_image_size=config.cond_image_size,
                      class_drop_prob=config.class_drop_prob, pkeep=config.pkeep,
                      seed=config.seed)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail fast, before any compile, with the offending field named.

    Reads the tokenizers' saved configs (cheap JSON reads).

    Raises:
      ValueError: on any field that cannot work, e.g. a tokenizer workdir with no checkpoint
        (saying what to run first), a block_size too short for prefix + codes, or a batch the
        devices cannot split (:func:`loop.check_config`).
    """
    loop.check_config(config, num_devices, DTYPES)
    if config.conditioning not in CONDITIONINGS:
        raise ValueError(f"config.conditioning={config.conditioning!r}; use one of "
                         f"{CONDITIONINGS}.")
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
    vq = _tokenizer(_tokenizer_config(config.tokenizer_workdir, "config.tokenizer_workdir"))
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
        cond = _tokenizer(_tokenizer_config(config.cond_tokenizer_workdir,
                                            "config.cond_tokenizer_workdir"))
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


def init_state(rng: jax.Array, sc: StepConfig, boxed: bool = False) -> TrainState:
    """Fresh GPT parameters and AdamW state (float32), unboxed from their logical axes.

    ``boxed=True`` keeps the ``nn.LogicallyPartitioned`` boxes (see
    :func:`loop.create_sharded_state`).
    """
    tokens = jnp.zeros((1, sc.gpt.block_size), jnp.int32)
    params = sc.gpt.init(rng, tokens)["params"]
    if not boxed:
        params = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=sc.tx.init(params))


# ----------------------------------------------------------------------------- the step

def prefix_and_codes(batch: dict[str, jax.Array], frozen: dict[str, Any], sc: StepConfig,
                     rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Encode a batch to ``(prefix: int32[B, P], codes: int32[B, N])`` with the frozen tokenizers.

    ``rng`` (training) drops class labels to the null class with ``class_drop_prob``; None
    (evaluation) keeps them.
    """
    x = batch["image"]  # float32[B, H, W, 3] in [-1, 1]
    b = x.shape[0]
    codes = sc.vq.apply({"params": frozen["tokenizer"]}, x, method="encode_to_indices")
    codes = codes.reshape(b, -1).astype(jnp.int32)
    cond = sc.conditioning
    if cond.kind == "unconditional":
        prefix = cond.sos_prefix(b)
    elif cond.kind == "class":
        prefix = cond.class_prefix(batch["label"])
        if rng is not None and sc.class_drop_prob > 0:
            drop = jax.random.bernoulli(rng, sc.class_drop_prob, (b, 1))
            prefix = jnp.where(drop, cond.null_prefix(b), prefix)
    else:
        s = sc.cond_image_size
        x_c = jax.image.resize(x, (b, s, s, 3), "linear", antialias=True)
        prefix = cond.image_prefix(sc.cond_vq.apply({"params": frozen["cond_tokenizer"]}, x_c,
                                                    method="encode_to_indices"))
    return jax.lax.stop_gradient(prefix), jax.lax.stop_gradient(codes)


def loss_fn(params: Any, prefix: jax.Array, codes: jax.Array, inputs: jax.Array, sc: StepConfig,
            rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy (nats) of the codes given the prefix and the (corrupted) inputs."""
    p = prefix.shape[1]
    tokens = jnp.concatenate([prefix, inputs[:, :-1]], axis=1)
    logits, _ = sc.gpt.apply({"params": params}, tokens, train=rng is not None,
                             rngs=None if rng is None else {"dropout": rng})
    logits = logits[:, p - 1:]  # (B, N, V): predictions of the N codes
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, codes))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
    return loss, dict(accuracy=accuracy)


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any],
               sc: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the cross-entropy of the image codes (Esser et al. 2021, eq. 8-9).

    Args:
      state: the TrainState (donated).
      batch: ``image``: float32[B, H, W, 3] in [-1, 1]; ``label``: int32[B] (class mode).
      frozen: ``tokenizer`` (and ``cond_tokenizer``) parameters, never updated.
      sc: static step configuration.

    With ``pkeep < 1`` each input code is replaced by a uniformly random code with probability
    ``1 - pkeep`` (taming's corruption); targets stay the true codes.

    Returns:
      ``(new_state, metrics)``: float32 scalars ``loss`` (nats per code), ``bits_per_code``
      (loss / ln 2), ``accuracy`` (top-1 on the codes), ``grad_norm`` and ``nonfinite`` (1
      when the loss or gradient was NaN/Inf and the update was skipped).
    """
    rng = jax.random.fold_in(jax.random.key(sc.seed), state.step)
    drop_rng, keep_rng, code_rng, dropout_rng = jax.random.split(rng, 4)
    prefix, codes = prefix_and_codes(batch, frozen, sc, drop_rng)
    inputs = codes
    if sc.pkeep < 1:
        keep = jax.random.bernoulli(keep_rng, sc.pkeep, codes.shape)
        inputs = jnp.where(keep, codes, jax.random.randint(code_rng, codes.shape, 0,
                                                           sc.gpt.vocab_size))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, prefix, codes, inputs, sc, dropout_rng)
    updates, opt_state = sc.tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    # Non-finite guard: a NaN/Inf loss or gradient leaves parameters and optimizer state as
    # they were; the step still advances.
    finite = loop.all_finite(loss, grad_norm)
    updated = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics = dict(loss=loss, bits_per_code=loss / jnp.log(2.0), accuracy=aux["accuracy"],
                   grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return (new_state.replace(step=state.step + 1),
            jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics))


def jit_train_step(sc: StepConfig, mesh, state_shardings, frozen_shardings):
    """``train_step`` jitted once with shardings over ``mesh``; the state is donated."""
    return loop.jit_step(functools.partial(train_step, sc=sc), mesh, state_shardings,
                         frozen_shardings)


# ----------------------------------------------------------------------------- frozen tokenizers

def load_frozen(config: ml_collections.ConfigDict, sc: StepConfig, mesh) -> tuple[dict, dict]:
    """The tokenizers' generator parameters from their workdirs' latest checkpoints, on ``mesh``.

    Only the generator weights are read (orbax partial restore): ``state.g_ema_params`` if the
    tokenizer run kept a generator EMA (its saved ``config.loss.ema_decay > 0``), else
    ``state.g_params`` (:func:`vqgan_jax.trainers.tokenizer.eval_params_field`); laid out by
    :func:`parallel.state_shardings` with ``config.sharding_rules``.

    Returns:
      ``(frozen, shardings)``: ``{"tokenizer": params[, "cond_tokenizer": params]}``.
    """
    frozen, shardings = {}, {}
    pairs = [("tokenizer", sc.vq, config.tokenizer_workdir, "config.tokenizer_workdir")]
    if sc.cond_vq is not None:
        pairs.append(("cond_tokenizer", sc.cond_vq, config.cond_tokenizer_workdir,
                      "config.cond_tokenizer_workdir"))
    for name, vq, workdir, field in pairs:
        frozen[name], shardings[name] = stage1.restore_eval_params(
            workdir, field, _tokenizer_config(workdir, field), vq, mesh,
            parallel.rules_from_config(config))
    return frozen, shardings


# ----------------------------------------------------------------------------- sampling

def image_grid(images: np.ndarray, rows: int, gap: int = 2) -> np.ndarray:
    """uint8[N, H, W, 3], N a multiple of ``rows`` -> one uint8 picture, row-major, white gaps."""
    n, h, w, _ = images.shape
    cols = n // rows
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = images[k]
    return out


def draw_images(params: Any, frozen: dict[str, Any], sc: StepConfig, prefix: jax.Array,
                rng: jax.Array, *, height: int, width: int, top_k: int = 0, top_p: float = 1.0,
                temperature: float | jax.Array = 1.0,
                guidance_scale: float | jax.Array | None = None) -> jax.Array:
    """Sample code grids after ``prefix`` and decode them with the frozen tokenizer (traceable:
    the body that :func:`sample_images` and :class:`vqgan_jax.api.Generator` jit).

    Args:
      height, width: the code grid, at least the training grid ``sc.grid``; larger grids use
        the sliding window (:func:`sampling.sample_sliding_window`).
      guidance_scale: classifier-free guidance scale (class mode); None: no guidance.
      The rest: as :func:`sample_images`.

    Returns:
      float32[B, height * f, width * f, 3] in [-1, 1].
    """
    gh, gw = sc.grid
    b = prefix.shape[0]
    null = None if guidance_scale is None else sc.conditioning.null_prefix(b)
    kw = dict(gpt=sc.gpt, top_k=top_k, top_p=top_p, temperature=temperature, null_prefix=null,
              guidance_scale=1.0 if guidance_scale is None else guidance_scale)
    if (height, width) == (gh, gw):
        codes = sampling.sample(params, prefix, rng, num_codes=gh * gw, **kw).reshape(b, gh, gw)
    else:
        codes = sampling.sample_sliding_window(params, prefix, rng, grid=sc.grid, height=height,
                                               width=width, **kw)
    x = sc.vq.apply({"params": frozen["tokenizer"]}, codes, method="decode_from_indices")
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def check_sampling_args(sc: StepConfig, height: int, width: int, guidance_scale: float) -> None:
    """Raise before any compile for a grid or guidance the model cannot sample.

    Raises:
      ValueError: for a grid smaller than the training grid, guidance outside class mode, or a
        sliding window in image mode (the condition would have to slide too).
    """
    gh, gw = sc.grid
    if height < gh or width < gw:
        raise ValueError(f"height x width = {height}x{width} codes is smaller than the training "
                         f"grid {gh}x{gw}; sample at least the training grid.")
    if guidance_scale != 1.0 and sc.conditioning.kind != "class":
        raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model "
                         "(trained with config.class_drop_prob > 0); leave it at 1.0.")
    if (height, width) != (gh, gw) and sc.conditioning.kind == "image":
        raise ValueError("Sliding-window sampling (height/width beyond the training grid) "
                         "supports unconditional and class-conditional models only.")


_draw_images = jax.jit(draw_images, static_argnames=("sc", "height", "width", "top_k", "top_p"))


def sample_images(params: Any, frozen: dict[str, Any], sc: StepConfig, prefix: jax.Array,
                  rng: jax.Array, *, height: int | None = None, width: int | None = None,
                  top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                  guidance_scale: float = 1.0) -> np.ndarray:
    """Sample code grids after ``prefix`` and decode them with the frozen tokenizer.

    Args:
      params: GPT parameters; frozen: as :func:`load_frozen` returns; sc: the step config.
      prefix: int32[B, P] (:class:`Conditioning` builds them).
      rng: a ``jax.random.key``.
      height, width: the code grid (default: the training grid). Larger grids use the sliding
        window (:func:`sampling.sample_sliding_window`); smaller ones raise.
      top_k, top_p, temperature: see :func:`sampling.filter_logits`.
      guidance_scale: classifier-free guidance (class mode only); 1 disables it.

    Returns:
      float32[B, height * f, width * f, 3] in [-1, 1].

    Raises:
      ValueError: as :func:`check_sampling_args`.
    """
    height, width = height or sc.grid[0], width or sc.grid[1]
    check_sampling_args(sc, height, width, guidance_scale)
    return np.asarray(_draw_images(
        params, frozen, sc, prefix, rng, height=height, width=width, top_k=top_k, top_p=top_p,
        temperature=temperature, guidance_scale=None if guidance_scale == 1.0 else guidance_scale))


def class_rows(conditioning: Conditioning, class_ids: list[int], num: int) -> jax.Array:
    """Prefixes for ``num`` samples of each class in ``class_ids`` (unconditional: ``num`` in all).

    Raises:
      ValueError: naming class_ids for ids outside [0, num_classes), none for a class model, or
        ids given to a model that is not class-conditional.
    """
    if conditioning.kind == "unconditional":
        if class_ids:
            raise ValueError(f"class_ids={list(class_ids)} was given but the model is "
                             "unconditional; leave class_ids out.")
        return conditioning.sos_prefix(num)
    if conditioning.kind != "class":
        raise ValueError("This model is image-conditional: sampling by class ids does not apply; "
                         "encode a condition image with the cond-stage tokenizer, build the "
                         "prefix with Conditioning.image_prefix and call sample_images.")
    bad = [c for c in class_ids if not 0 <= c < conditioning.num_classes]
    if bad or not class_ids:
        raise ValueError(f"class_ids={list(class_ids)}: give class ids in [0, "
                         f"{conditioning.num_classes}).")
    return conditioning.class_prefix(jnp.repeat(jnp.asarray(class_ids), num))


def load_for_sampling(workdir: str, mesh=None, step: int | None = None, field: str = "--workdir"
                      ) -> tuple[Any, dict, StepConfig, ml_collections.ConfigDict]:
    """A stage-2 workdir's GPT parameters (newest intact checkpoint, or ``step``), its frozen
    tokenizers (their newest) and its config, laid out on ``mesh`` (default: one device).

    Raises:
      ValueError: naming ``field`` when ``workdir`` holds no stage-2 checkpoint (or ``step``
        when there is no such checkpoint).
    """
    workdir = loop.absolute(workdir)
    config = loop.read_config(workdir, field, step)
    if config.get("stage") != "transformer":
        raise ValueError(f"{field}={workdir!r} holds a {config.get('stage')!r} run; point it "
                         "at a stage-2 (transformer) workdir.")
    mesh = mesh or parallel.create_mesh(devices=jax.devices()[:1])
    sc = build_step_config(config)
    boxed = jax.eval_shape(functools.partial(init_state, sc=sc, boxed=True),
                           jax.random.key(0)).params
    params = loop.restore_subtree(workdir, field, "params", loop.abstract_like(
        parallel.unbox(boxed), parallel.state_shardings(boxed, mesh,
                                                        parallel.rules_from_config(config))),
        step)
    frozen, _ = load_frozen(config, sc, mesh)
    return params, frozen, sc, config


def _sample_grid(params, frozen, sc, config, rng) -> np.ndarray:
    """The end-of-training picture: a row per class (up to config.sample.max_rows); None in
    image mode or with ``config.sample.num_per_row=0``."""
    s = config.sample
    cond = sc.conditioning
    if cond.kind == "image" or s.num_per_row == 0:
        return None
    rows = min(s.max_rows, cond.num_classes) if cond.kind == "class" else 1
    prefix = (class_rows(cond, list(range(rows)), s.num_per_row) if cond.kind == "class"
              else cond.sos_prefix(s.num_per_row))
    images = sample_images(params, frozen, sc, prefix, rng, top_k=s.top_k, top_p=s.top_p,
                           temperature=s.temperature, guidance_scale=s.guidance_scale)
    return image_grid(np.asarray(metrics_lib.to_uint8(images)), rows)


# ----------------------------------------------------------------------------- the job

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train the GPT per ``config`` in ``workdir`` through :func:`loop.run_job` (resume,
    preemption, non-finite steps, checkpoints and logs as described there). At the end it
    writes ``metrics.json`` (the last logged train metrics) and ``samples.png`` (class and
    unconditional modes: a row per class, decoded by the frozen tokenizer).

    Returns:
      The last logged train metrics: ``loss`` (nats per code), ``bits_per_code``,
      ``accuracy``, ``grad_norm``, ``codes_per_s``, ``img_per_s``, ``nonfinite_steps``,
      ``step``; or ``{"preempted_at_step": step}``.

    Raises:
      ValueError: for a config field or dataset that cannot work, before anything compiles.
      FloatingPointError: after ``config.max_consecutive_nonfinite`` non-finite steps in a row.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for field in ("tokenizer_workdir", "cond_tokenizer_workdir"):
        if config[field]:  # saved absolute, so the sample CLI finds them from anywhere
            config[field] = loop.absolute(config[field])
    validate_config(config, jax.device_count())
    train_source = sources.get_source(config.dataset, config.train_split, data_dir=config.data_dir)
    if config.conditioning == "class" and train_source.num_classes > config.num_classes:
        raise ValueError(f"config.num_classes={config.num_classes} but {config.dataset!r} has "
                         f"{train_source.num_classes} classes; set config.num_classes to at "
                         "least that.")
    sc = build_step_config(config)
    codes_per_step = config.batch_size * math.prod(sc.grid)

    def make_job(mesh, rules, workdir):
        params = jax.eval_shape(functools.partial(init_state, sc=sc), jax.random.key(0)).params
        logging.info("GPT with %.2fM parameters; %s conditioning, %d prefix + %d codes",
                     sum(x.size for x in jax.tree.leaves(params)) / 1e6, config.conditioning,
                     sc.conditioning.prefix_length, math.prod(sc.grid))
        frozen, frozen_shardings = load_frozen(config, sc, mesh)

        def finish(state, step, summary, writer):
            summary["step"] = step
            if jax.process_index() == 0:
                loop.write_json(os.path.join(workdir, "metrics.json"), summary)
            grid = _sample_grid(state.params, frozen, sc, config, jax.random.key(config.seed))
            if grid is not None:
                loop.write_picture(writer, workdir, step, "samples", "samples.png", grid)
            return summary

        return loop.Job(
            init=functools.partial(init_state, sc=sc), frozen=frozen, finish=finish,
            jit_step=lambda _, shardings: jit_train_step(sc, mesh, shardings, frozen_shardings),
            batch_fields=("image", "label"),
            extra_scalars=lambda n, seconds: dict(codes_per_s=n * codes_per_step / seconds))
    return loop.run_job(config, workdir, train_source, make_job)
