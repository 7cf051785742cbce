"""Stage 2: train a GPT over a frozen tokenizer's codes (Esser et al. 2021, sec. 3.2; taming's
``Net2NetTransformer``); sampling a trained workdir is :mod:`vqgan_jax.samplers.autoregressive`'s.

Codes are made on the fly: each batch of augmented crops from the stage-1 grain pipeline goes
through the frozen tokenizer's encoder inside the jitted step, so every epoch sees new random
crops and flips (a token cache written once would freeze one augmentation per image).

Token layout: codes are ``[0, V)`` (V = the tokenizer's n_embed); conditioning tokens follow
(:class:`vqgan_jax.models.registry.Conditioning`). The sequence is ``prefix + codes``; the GPT
reads ``(prefix + codes)[:-1]`` and its logits from the last prefix position on predict the
codes, so the loss covers the image codes only.
"""

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from vqgan_jax import metrics as metrics_lib, workdir as workdir_lib
from vqgan_jax.data import sources
from vqgan_jax.samplers.autoregressive import class_rows, image_grid, sample_images
from vqgan_jax.state import transformer as stage_state
from vqgan_jax.state.transformer import StepConfig, TrainState
from vqgan_jax.trainers import loop


# ----------------------------------------------------------------------------- the step

def encode_codes(vq: Any, tokenizer_params: Any, images: jax.Array) -> jax.Array:
    """float32[B, H, W, 3] images in [-1, 1] -> int32[B, h * w] codes of the frozen tokenizer
    ``vq`` (row-major over its ``h x w = H/f x W/f`` code grid), no gradient."""
    codes = vq.apply({"params": tokenizer_params}, images, method="encode_to_indices")
    return jax.lax.stop_gradient(codes.reshape(images.shape[0], -1).astype(jnp.int32))


def prefix_and_codes(batch: dict[str, jax.Array], frozen: dict[str, Any], sc: StepConfig,
                     rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Encode a batch to ``(prefix: int32[B, P], codes: int32[B, N])`` with the frozen tokenizers.

    ``rng`` (training) drops class labels to the null class with ``class_drop_prob``; None
    (evaluation) keeps them.
    """
    x = batch["image"]  # float32[B, H, W, 3] in [-1, 1]
    b = x.shape[0]
    codes = encode_codes(sc.vq, frozen["tokenizer"], x)
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
    # Non-finite guard: a NaN/Inf loss or gradient leaves parameters and optimizer state as
    # they were; the step still advances.
    new_state, grad_norm, finite = loop.update_if_finite(state, grads, loss, sc.tx)
    metrics = dict(loss=loss, bits_per_code=loss / jnp.log(2.0), accuracy=aux["accuracy"],
                   grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return (new_state.replace(step=state.step + 1),
            jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics))


def jit_train_step(sc: StepConfig, mesh, state_shardings, frozen_shardings):
    """``train_step`` jitted once with shardings over ``mesh`` (:func:`loop.jit_step`: the
    state is donated on accelerators)."""
    return loop.jit_step(functools.partial(train_step, sc=sc), mesh, state_shardings,
                         frozen_shardings)


# ----------------------------------------------------------------------------- sampling

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
    return run_stage2(
        config, workdir, stage_state, jit_train_step, _sample_grid,
        describe=lambda sc, config: f"GPT; {config.conditioning} conditioning, "
        f"{sc.conditioning.prefix_length} prefix + {math.prod(sc.grid)} codes")


def run_stage2(config: ml_collections.ConfigDict, workdir: str, state_module: Any,
               jit_train_step: Any, sample_grid: Any, describe: Any,
               check: Any = None) -> dict[str, float]:
    """The job both stage-2 generators run through :func:`loop.run_job` (this module's GPT and
    :mod:`vqgan_jax.trainers.maskgit`), given the stage's ``state_module`` (its
    ``validate_config``, ``build_step_config``, ``init_state`` and ``load_frozen``), its
    ``jit_train_step(sc, mesh, state_shardings, frozen_shardings)``, its ``sample_grid(params,
    frozen, sc, config, rng)`` (uint8 picture or None) and ``describe(sc, config)`` (the log
    line's model summary); ``check(config, sc)``, if given, runs before anything compiles.

    The tokenizer workdirs are saved absolute (the sample CLI finds them from anywhere); the
    dataset must not have more classes than ``config.num_classes`` (class mode). At the end:
    ``metrics.json`` (the last logged train metrics and ``step``) and ``samples.png``.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for field in ("tokenizer_workdir", "cond_tokenizer_workdir"):
        if config.get(field):
            config[field] = workdir_lib.absolute(config[field])
    state_module.validate_config(config, jax.device_count())
    train_source = sources.get_source(config.dataset, config.train_split, data_dir=config.data_dir)
    if config.conditioning == "class" and train_source.num_classes > config.num_classes:
        raise ValueError(f"config.num_classes={config.num_classes} but {config.dataset!r} has "
                         f"{train_source.num_classes} classes; set config.num_classes to at "
                         "least that.")
    sc = state_module.build_step_config(config)
    if check is not None:
        check(config, sc)
    codes_per_step = config.batch_size * math.prod(sc.grid)
    init = functools.partial(state_module.init_state, sc=sc)

    def make_job(mesh, rules, workdir):
        params = jax.eval_shape(init, jax.random.key(0)).params
        logging.info("%s; %.2fM parameters", describe(sc, config),
                     sum(x.size for x in jax.tree.leaves(params)) / 1e6)
        frozen, frozen_shardings = state_module.load_frozen(config, sc, mesh)

        def finish(state, step, summary, writer):
            summary["step"] = step
            if jax.process_index() == 0:
                workdir_lib.write_json(os.path.join(workdir, "metrics.json"), summary)
            grid = sample_grid(state.params, frozen, sc, config, jax.random.key(config.seed))
            if grid is not None:
                loop.write_picture(writer, workdir, step, "samples", "samples.png", grid)
            return summary

        return loop.Job(
            init=init, frozen=frozen, finish=finish,
            jit_step=lambda _, shardings: jit_train_step(sc, mesh, shardings, frozen_shardings),
            batch_fields=("image", "label"),
            extra_scalars=lambda n, seconds: dict(codes_per_s=n * codes_per_step / seconds))
    return loop.run_job(config, workdir, train_source, make_job)
