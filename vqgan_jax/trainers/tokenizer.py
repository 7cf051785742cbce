"""Stage 1: train the tokenizer (Esser et al. 2021, sec. 3.1, eq. 5-7).

The tokenizer is ``config.arch``: the conv VQGAN (:class:`VQModel`) or the ViT-VQGAN
(:class:`ViTVQModel`, Yu et al. 2021); the discriminator ``config.disc.kind``: taming's PatchGAN
or StyleGAN2's (see :func:`vqgan_jax.models.registry.build_models`).

One jitted step updates the generator (encoder, quantizer, decoder) and the discriminator
from one batch. No work is done twice:

* the discriminator's update reuses the generator's reconstruction and the forward pass of
  the discriminator on it (taming's loop runs the autoencoder and that pass again);
* the adaptive weight lambda needs ||dL_rec/dW|| and ||dL_GAN/dW|| at the decoder's last
  layer W. We take dL/dx_hat of both losses (which the generator's backward pass needs anyway),
  carry each through the last conv alone, and then run a single backward pass through the
  generator with the combined cotangent ``dL_rec/dx_hat + lambda * d * dL_GAN/dx_hat``
  (taming runs two extra full backward passes through the generator).

Optional regularizers (all off by default, which is taming's recipe): the R1 gradient
penalty on the discriminator, lazily every ``r1_every`` steps; LeCAM regularization with EMA
anchors kept in the state; an EMA of the generator's weights, which evaluation, stage 2 and
``python -m vqgan_jax.evaluate`` then use instead of the raw weights (:func:`eval_params`).
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from vqgan_jax import losses, parallel, scoring, workdir as workdir_lib
from vqgan_jax.data import pipeline, sources
from vqgan_jax.models import quantizers
from vqgan_jax.models.lpips import load_lpips_params, lpips_fn
from vqgan_jax.state.tokenizer import (StepConfig, TrainState, build_step_config, eval_params,
                                       init_state, validate_config)
from vqgan_jax.trainers import loop

def _write_codebook(g_params: Any, update: dict[str, Any]) -> Any:
    """Write the codebook rows the quantizer replaced outside the gradient (EMA, restarts)."""
    if "codebook_update" not in update:
        return g_params
    q = g_params["quantize"]
    codebook = jnp.where(update["codebook_update_mask"][:, None], update["codebook_update"],
                         q["codebook"])
    return dict(g_params, quantize=dict(q, codebook=codebook))


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
    return functools.reduce(lambda t, k: t[k], path, tree)


def _set_path(tree: Any, path: tuple[str, ...], leaf: Any) -> Any:
    """A copy of the nested dict ``tree`` with ``leaf`` at ``path``."""
    if not path:
        return leaf
    return dict(tree, **{path[0]: _set_path(tree[path[0]], path[1:], leaf)})


def _nest(path: tuple[str, ...], leaf: Any) -> Any:
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def reconstruction_loss(x: jax.Array, x_hat: jax.Array, lpips_params: Any, sc: StepConfig
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reconstruction ("nll") loss of the generator, float32::

        L_rec = l1_weight |x - x_hat|_1 + l2_weight |x - x_hat|^2
                + logit_laplace_weight L_logit-laplace(x, x_hat) + perceptual_weight LPIPS

    (means over elements; :mod:`vqgan_jax.losses`). Terms with weight 0 are not added
    (logit-Laplace and LPIPS are not even computed); taming's is L1 + LPIPS.

    Returns:
      ``(L_rec, parts)`` with the unweighted ``l1_loss``, ``l2_loss``, ``logit_laplace_loss``
      and ``perceptual_loss`` (0 where not computed).
    """
    zero = jnp.zeros((), jnp.float32)
    l1, l2 = losses.l1_loss(x, x_hat), losses.l2_loss(x, x_hat)
    ll = losses.logit_laplace_loss(x, x_hat) if sc.logit_laplace_weight > 0 else zero
    p_loss = (jnp.mean(lpips_fn(lpips_params, x, x_hat, sc.dtype))
              if sc.perceptual_weight > 0 else zero)
    terms = [(sc.l1_weight, l1), (sc.l2_weight, l2), (sc.logit_laplace_weight, ll)]
    nll = sum((w * t for w, t in terms if w > 0), start=sc.perceptual_weight * p_loss)
    return nll, dict(l1_loss=l1, l2_loss=l2, logit_laplace_loss=ll, perceptual_loss=p_loss)


def compute_grads(state: TrainState, batch: dict[str, jax.Array], lpips_params: Any, sc: StepConfig,
                  adversarial: bool = True
                  ) -> tuple[Any, Any, Any, dict[str, jax.Array], dict[str, Any]]:
    """Generator and discriminator gradients for one batch (Esser et al. 2021, eq. 5-7).

    Generator loss (taming's VQLPIPSWithDiscriminator, optimizer 0, by default)::

        L_G = L_rec(x, x_hat)                     (:func:`reconstruction_loss`, "nll")
              + lambda * d * L_GAN(D(x_hat))      (gen_loss; taming: -mean D(x_hat))
              + codebook_weight * L_VQ
        lambda = clip(||dL_rec/dW|| / (||dL_GAN/dW|| + 1e-4), 0, 1e4) * disc_weight   (eq. 7)

    with W the kernel of the decoder's last layer (``vq.last_layer_path``) and d =
    disc_factor from ``disc_start`` on, else 0; with ``adaptive_disc_weight=False``
    lambda = disc_weight (Yu et al. 2021: 0.1). Discriminator loss::

        L_D = d * (disc_loss(D(x), D(sg[x_hat])) + lecam_weight * R_LC)       (every step)
              + d * r1_weight / 2 * r1_every * R1(x)          (steps with step % r1_every == 0)

    R_LC uses the anchors in ``state.lecam_ema`` (:func:`losses.lecam_reg`), R1 the real images
    (:func:`losses.r1_penalty`; lazy as in StyleGAN2, and not computed on other steps).

    ``adversarial=False`` is the program for steps before ``disc_start``, where d = 0: only
    L_G = L_rec + codebook_weight * L_VQ, with no discriminator pass, no adaptive weight and no
    discriminator gradients (``d_grads`` is None; the adversarial metrics are 0). Its generator
    gradients are those of the full program at d = 0.

    Args:
      state: the TrainState (donated).
      batch: ``image``: float32[B, H, W, 3] in [-1, 1], sharded over the batch.
      lpips_params: frozen LPIPS weights (:func:`load_lpips_params`).
      sc: static step configuration.

    Returns:
      ``(g_grads, d_grads, d_batch_stats, metrics, quantizer_update)``: gradients shaped like
      the parameters, the discriminator's updated BatchNorm statistics, float32 scalar
      metrics (the quantizer's scalar aux terms included), and ``quantizer_update``: ``stats``
      (the new :attr:`TrainState.quantizer_stats`) and, for quantizers that set codebook rows
      outside the gradient, ``codebook_update``/``codebook_update_mask``
      (:mod:`vqgan_jax.models.quantizers`).
    """
    x = batch["image"]
    rng = jax.random.fold_in(jax.random.key(sc.seed), state.step)
    vq, disc = sc.vq, sc.disc
    q_rngs = {"dropout": rng, quantizers.RNG: jax.random.fold_in(rng, 1)}

    def generator(g_params):
        variables = {"params": g_params}
        (z_q, aux), q_vars = vq.apply(
            dict(variables, **{quantizers.STATS: state.quantizer_stats}), x, True, state.step,
            method="encode", rngs=q_rngs, mutable=[quantizers.STATS])
        h = vq.apply(variables, z_q, True, method="decoder_features",
                     rngs={"dropout": rng})
        x_hat = vq.apply(variables, h, method="last_layer")
        return (x_hat, aux["vq_loss"]), (h, aux, q_vars.get(quantizers.STATS, {}))

    (x_hat, vq_loss), generator_vjp, (h, aux, q_stats) = jax.vjp(
        generator, state.g_params, has_aux=True)
    quantizer_update = dict(stats=q_stats, **{k: aux[k] for k in (
        "codebook_update", "codebook_update_mask") if k in aux})

    rec_loss = lambda x_hat: reconstruction_loss(x, x_hat, lpips_params, sc)
    (nll, rec_parts), nll_ct = jax.value_and_grad(rec_loss, has_aux=True)(x_hat)

    def step_metrics(loss, g_grads, **adversarial_metrics):
        zero = jnp.zeros((), jnp.float32)
        metrics = dict(
            loss=loss, nll_loss=nll, **rec_parts, vq_loss=vq_loss,
            **{k: adversarial_metrics.get(k, zero) for k in (
                "g_loss", "d_loss", "d_weight", "disc_factor", "lecam_loss", "r1_penalty",
                "logits_real", "logits_fake", "d_grad_norm")},
            codebook_loss=aux["codebook_loss"], commitment_loss=aux["commitment_loss"],
            perplexity=aux["perplexity"], codebook_usage=aux["codebook_usage"],
            g_grad_norm=optax.tree.norm(g_grads))
        metrics.update({k: v for k, v in aux.items() if k not in metrics and jnp.ndim(v) == 0})
        return jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    if not adversarial:  # before disc_start: the discriminator takes no part in the step
        (g_grads,) = generator_vjp((nll_ct, jnp.asarray(sc.codebook_weight, vq_loss.dtype)))
        metrics = step_metrics(nll + sc.codebook_weight * vq_loss, g_grads)
        return g_grads, None, state.d_batch_stats, metrics, quantizer_update

    def discriminate(d_params, batch_stats, images):
        logits, updates = disc.apply({"params": d_params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
        return logits, updates.get("batch_stats", {})

    # One discriminator pass on x_hat serves both the generator and the discriminator update.
    logits_fake, fake_vjp, batch_stats = jax.vjp(
        lambda d_params, x_hat: discriminate(d_params, state.d_batch_stats, x_hat),
        state.d_params, x_hat, has_aux=True)
    g_loss, g_loss_ct = jax.value_and_grad(functools.partial(losses.g_loss, sc.gen_loss))(
        logits_fake)
    gan_ct = fake_vjp(g_loss_ct)[1]

    disc_factor = losses.adopt_weight(sc.disc_factor, state.step, sc.disc_start)
    if sc.adaptive_disc_weight:
        # Adaptive weight from the two gradients carried through the last layer only, both
        # in one batched VJP; the last kernel's gradient in g_grads is then their combination.
        path = vq.last_layer_path
        last = _get_path(state.g_params, path)
        _, last_vjp = jax.vjp(
            lambda kernel: vq.apply({"params": _nest(path, dict(last, kernel=kernel))}, h,
                                    method="last_layer"),
            last["kernel"])
        nll_w, gan_w = jax.vmap(lambda ct: last_vjp(ct)[0])(
            jnp.stack([nll_ct, gan_ct.astype(nll_ct.dtype)]))
        d_weight = losses.adaptive_weight(nll_w, gan_w, sc.disc_weight)
    else:
        d_weight = jnp.asarray(sc.disc_weight, jnp.float32)
    gan_scale = d_weight * disc_factor
    loss = nll + gan_scale * g_loss + sc.codebook_weight * vq_loss

    # One backward pass through the generator with the combined cotangent.
    x_hat_ct = nll_ct + (gan_scale * gan_ct.astype(jnp.float32)).astype(nll_ct.dtype)
    (g_grads,) = generator_vjp((x_hat_ct, jnp.asarray(sc.codebook_weight, vq_loss.dtype)))
    if sc.adaptive_disc_weight:   # linear in the cotangent: XLA drops the kernel's third VJP
        last_w = (nll_w.astype(jnp.float32) + gan_scale * gan_w.astype(jnp.float32))
        g_grads = _set_path(g_grads, path + ("kernel",), last_w.astype(nll_w.dtype))

    # Discriminator: real pass, and the fake pass above with the discriminator's cotangent.
    logits_real, real_vjp, batch_stats = jax.vjp(
        lambda d_params: discriminate(d_params, batch_stats, x), state.d_params, has_aux=True)
    def d_loss_fn(real, fake):
        gan = losses.d_loss(sc.disc_loss, real, fake)
        lecam = (losses.lecam_reg(real, fake, state.lecam_ema[0], state.lecam_ema[1])
                 if sc.lecam_weight > 0 else jnp.zeros((), jnp.float32))
        return disc_factor * (gan + sc.lecam_weight * lecam), lecam

    (d_loss, lecam), (real_ct, fake_ct) = jax.value_and_grad(
        d_loss_fn, argnums=(0, 1), has_aux=True)(logits_real, logits_fake)
    d_grads = jax.tree.map(jnp.add, real_vjp(real_ct)[0], fake_vjp(fake_ct)[0])

    r1 = jnp.zeros((), jnp.float32)
    if sc.r1_weight > 0:  # Lazy R1 (Karras et al. 2020, sec. 3.1): only every r1_every steps.
        r1_fn = lambda d_params: losses.r1_penalty(
            lambda images: discriminate(d_params, state.d_batch_stats, images)[0], x)
        r1, r1_grads = jax.lax.cond(
            (state.step % sc.r1_every == 0) & (state.step >= sc.disc_start),
            lambda: jax.value_and_grad(r1_fn)(state.d_params),
            lambda: (r1, jax.tree.map(jnp.zeros_like, state.d_params)))
        r1_scale = disc_factor * (0.5 * sc.r1_weight * sc.r1_every)
        d_grads = jax.tree.map(lambda g, r: g + r1_scale * r, d_grads, r1_grads)

    metrics = step_metrics(
        loss, g_grads, g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, disc_factor=disc_factor,
        lecam_loss=lecam, r1_penalty=r1, logits_real=jnp.mean(logits_real.astype(jnp.float32)),
        logits_fake=jnp.mean(logits_fake.astype(jnp.float32)),
        d_grad_norm=optax.tree.norm(d_grads))
    return g_grads, d_grads, batch_stats, metrics, quantizer_update


def reference_grads(state: TrainState, batch: dict[str, jax.Array], lpips_params: Any,
                    sc: StepConfig) -> tuple[Any, Any, jax.Array]:
    """The same gradients as :func:`compute_grads`, computed the unfused way taming does.

    Three backward passes through the generator (for ||dL_rec/dW||, ||dL_GAN/dW|| and the
    total loss) and fresh discriminator passes for its update. Kept as the reference the
    fused step is tested against (tests/test_train_step.py) and as the baseline of
    ``benchmarks/train_step.py --variant=reference``; too slow for training.

    Returns:
      ``(g_grads, d_grads, d_weight)``.
    """
    x = batch["image"]
    d_vars = {"params": state.d_params, "batch_stats": state.d_batch_stats}

    def parts(g_params):
        x_hat, aux = sc.vq.apply({"params": g_params}, x, True)
        nll, _ = reconstruction_loss(x, x_hat, lpips_params, sc)
        logits_fake, _ = sc.disc.apply(d_vars, x_hat, train=True, mutable=["batch_stats"])
        return nll, losses.g_loss(sc.gen_loss, logits_fake), aux["vq_loss"], x_hat

    if sc.adaptive_disc_weight:
        last = lambda grads: _get_path(grads, sc.vq.last_layer_path)["kernel"]
        nll_w = last(jax.grad(lambda p: parts(p)[0])(state.g_params))
        gan_w = last(jax.grad(lambda p: parts(p)[1])(state.g_params))
        d_weight = losses.adaptive_weight(nll_w, gan_w, sc.disc_weight)
    else:
        d_weight = jnp.asarray(sc.disc_weight, jnp.float32)
    disc_factor = losses.adopt_weight(sc.disc_factor, state.step, sc.disc_start)

    def total(g_params):
        nll, g_loss, vq_loss, _ = parts(g_params)
        return nll + d_weight * disc_factor * g_loss + sc.codebook_weight * vq_loss

    g_grads = jax.grad(total)(state.g_params)
    x_hat = jax.lax.stop_gradient(parts(state.g_params)[3])

    def d_total(d_params):
        def d(images):
            return sc.disc.apply({"params": d_params, "batch_stats": state.d_batch_stats},
                                 images, train=True, mutable=["batch_stats"])[0]
        real, fake = d(x), d(x_hat)
        total = losses.d_loss(sc.disc_loss, real, fake)
        if sc.lecam_weight > 0:
            total += sc.lecam_weight * losses.lecam_reg(real, fake, *state.lecam_ema)
        if sc.r1_weight > 0:
            on = (state.step % sc.r1_every == 0).astype(jnp.float32)
            total += on * 0.5 * sc.r1_weight * sc.r1_every * losses.r1_penalty(d, x)
        return disc_factor * total

    return g_grads, jax.grad(d_total)(state.d_params), d_weight


def train_step(state: TrainState, batch: dict[str, jax.Array], lpips_params: Any,
               sc: StepConfig, adversarial: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """:func:`compute_grads`, then one Adam update of each model.

    ``adversarial=False`` (the program for steps before ``disc_start``) updates the generator
    only: the discriminator's parameters, optimizer state, BatchNorm statistics and the LeCAM
    anchors are left exactly as they were, so the discriminator's Adam starts at disc_start.

    A quantizer that sets codebook rows outside the gradient (ema_vq, dead-code restart) has
    them written into the codebook after the generator's update, and its statistics advanced.
    With ``ema_decay > 0`` the generator EMA becomes ``ema_decay * ema + (1 - ema_decay) *
    new g_params``; with ``lecam_weight > 0`` the LeCAM anchors follow this batch's mean logits
    (:func:`losses.lecam_update`). If the loss, the discriminator loss or either gradient norm
    is NaN or Inf, no update is applied (parameters, optimizer states, BatchNorm and quantizer
    statistics, EMA and anchors stay as they were), the step counter still advances, and
    ``metrics["nonfinite"]`` is 1.

    Returns:
      ``(new_state, metrics)`` with float32 scalar metrics (see :func:`compute_grads`) plus
      ``nonfinite`` (0 or 1).
    """
    g_grads, d_grads, batch_stats, metrics, quantizer_update = compute_grads(
        state, batch, lpips_params, sc, adversarial)
    g_updates, g_opt_state = sc.g_tx.update(g_grads, state.g_opt_state, state.g_params)
    # EMA / restarted codebook rows are written over the optimizer's update.
    g_params = _write_codebook(optax.apply_updates(state.g_params, g_updates), quantizer_update)
    updated = state.replace(g_params=g_params, g_opt_state=g_opt_state,
                            quantizer_stats=quantizer_update["stats"])
    if adversarial:
        d_updates, d_opt_state = sc.d_tx.update(d_grads, state.d_opt_state, state.d_params)
        updated = updated.replace(d_params=optax.apply_updates(state.d_params, d_updates),
                                  d_batch_stats=batch_stats, d_opt_state=d_opt_state)
    if sc.ema_decay > 0:  # EMA of the updated generator weights (evaluation uses it)
        updated = updated.replace(g_ema_params=optax.incremental_update(
            g_params, state.g_ema_params, 1.0 - sc.ema_decay))
    if sc.lecam_weight > 0 and adversarial:  # the anchors follow D's mean outputs on this batch
        updated = updated.replace(lecam_ema=losses.lecam_update(
            state.lecam_ema, metrics["logits_real"], metrics["logits_fake"], sc.lecam_ema_decay))
    # Non-finite guard: a NaN/Inf loss or gradient leaves both models, both optimizer states
    # and the BatchNorm statistics as they were; the step still advances (its data is used).
    finite = loop.all_finite(metrics["loss"], metrics["d_loss"], metrics["g_grad_norm"],
                             metrics["d_grad_norm"])
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    metrics = dict(metrics, nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state.replace(step=state.step + 1), metrics


def jit_train_step(sc: StepConfig, mesh, state_shardings, lpips_params, adversarial: bool = True):
    """``train_step`` jitted once with shardings over ``mesh`` (:func:`loop.jit_step`: the
    state is donated on accelerators).

    ``adversarial``: the full step (True) or the generator-only step used before
    ``disc_start`` (False; see :func:`train_step`).

    ``lpips_params`` keep the shardings they have (:func:`lpips_shardings`); host arrays are
    taken replicated.
    """
    lpips_in = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array)
                            and isinstance(x.sharding, jax.sharding.NamedSharding)
                            and x.sharding.mesh == mesh else parallel.replicated(mesh),
                            lpips_params)
    return loop.jit_step(functools.partial(train_step, sc=sc, adversarial=adversarial), mesh,
                         state_shardings, lpips_in)


def lpips_shardings(mesh, rules) -> Any:
    """NamedShardings of the frozen LPIPS weights by the logical-axis ``rules``."""
    from vqgan_jax.models.lpips import LPIPS
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), x, x)["params"])
    return parallel.state_shardings(abstract, mesh, rules)


# ----------------------------------------------------------------------------- the job

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train the tokenizer per ``config`` in ``workdir`` through :func:`loop.run_job`
    (resume, preemption, non-finite steps, checkpoints and logs as described there).

    Steps before ``disc_start`` run the generator-only program. Every
    ``config.eval_every_steps`` and at the end, the held-out images are scored
    (:func:`vqgan_jax.scoring.evaluate`: psnr in dB, ssim, lpips, codebook_usage as a
    fraction, perplexity) into ``eval/*`` scalars, ``metrics.json`` and
    ``reconstructions.png`` (originals | reconstructions).

    Returns:
      The final held-out metrics, or ``{"preempted_at_step": step}``.

    Raises:
      ValueError: for a config field or dataset that cannot work, before anything compiles.
      FloatingPointError: after ``config.max_consecutive_nonfinite`` non-finite steps in a row.
    """
    validate_config(config, jax.device_count())
    train_source = sources.get_source(config.dataset, config.train_split, data_dir=config.data_dir)
    sc = build_step_config(config)
    eval_images = pipeline.eval_images(  # the demo's held-out photos at full size
        sources.get_source(config.dataset, config.eval_split, data_dir=config.data_dir),
        multiple_of=sc.vq.downsample_factor, max_images=config.num_eval_images,
        image_size=None if config.dataset == "demo" else config.image_size)

    def make_job(mesh, rules, workdir):
        lpips_params = jax.device_put(load_lpips_params(), lpips_shardings(mesh, rules))

        def evaluate(state, step, writer):
            metrics, recs = scoring.evaluate(eval_params(state), lpips_params, eval_images, sc.vq)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
            loop.write_picture(writer, workdir, step, "eval/input|reconstruction",
                               "reconstructions.png",
                               scoring.comparison_grid(eval_images, recs))
            if jax.process_index() == 0:
                workdir_lib.write_json(os.path.join(workdir, "metrics.json"), dict(metrics, step=step))
            return metrics

        def finish(state, step, summary, writer):
            metrics = evaluate(state, step, writer)
            logging.info("Held-out metrics at step %d: %s", step, metrics)
            return metrics

        return loop.Job(
            init=functools.partial(init_state, sc=sc, image_size=config.image_size),
            jit_step=lambda name, shardings: jit_train_step(sc, mesh, shardings, lpips_params,
                                                            name == "train_step"),
            frozen=lpips_params, evaluate=evaluate, finish=finish,
            program=lambda step: ("train_step" if step >= sc.disc_start
                                  else "train_step before disc_start"),
            extra_scalars=lambda n, seconds: dict(skipped_images=train_source.num_skipped))
    return loop.run_job(config, workdir, train_source, make_job)
