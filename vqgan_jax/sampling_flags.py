"""The stage-2 sampling flags ``python -m vqgan_jax.sample`` and ``python -m vqgan_jax.evaluate``
share (defined here once; both CLIs import this module), and :func:`values`, their values as the
keyword arguments of :meth:`vqgan_jax.api.Generator.sample` and
:func:`vqgan_jax.scoring.evaluate_samples` take.

``--top_p`` applies to a GPT, ``--num_steps`` and ``--choice_temperature`` to a MaskGIT; the rest
to both (see :mod:`vqgan_jax.samplers.guidance` for the schedules).
"""

from absl import app, flags

from vqgan_jax.samplers.guidance import KINDS

_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely codes; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "GPT: nucleus, the smallest set of codes of mass >= p "
                            "(1 keeps all).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Divides the logits.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance; 1 is off.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same images.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "MaskGIT: decoding steps (default: the "
                                  "run's config.sample.num_steps).")
_CHOICE_TEMPERATURE = flags.DEFINE_float(
    "choice_temperature", None, "MaskGIT: Gumbel noise on the confidences, annealed to 0 "
    "(default: the run's config.sample.choice_temperature).")
_GUIDANCE_SCHEDULE = flags.DEFINE_enum(
    "guidance_schedule", "constant", list(KINDS),
    "The guidance scale over the sampling (see samplers.guidance.GuidanceSchedule).")
_GUIDANCE_POWER = flags.DEFINE_float("guidance_power", 1.0, "power_cosine: its exponent, > 0.")
_GUIDANCE_INTERVAL = flags.DEFINE_list("guidance_interval", ["0", "1"], "interval: lo,hi in "
                                       "[0, 1], the progress range guided.")


def values() -> dict:
    """The flags as keyword arguments: ``top_k``, ``top_p``, ``temperature``,
    ``guidance_scale``, ``seed``, ``num_steps``, ``choice_temperature``, ``guidance_schedule``,
    ``guidance_power``, ``guidance_interval`` (a (lo, hi) pair of floats).

    Raises:
      app.UsageError: for a ``--guidance_interval`` that is not two numbers.
    """
    try:
        lo, hi = (float(v) for v in _GUIDANCE_INTERVAL.value)
    except ValueError as e:
        raise app.UsageError(f"--guidance_interval={','.join(_GUIDANCE_INTERVAL.value)}: give "
                             "lo,hi (two numbers in [0, 1]).") from e
    return dict(top_k=_TOP_K.value, top_p=_TOP_P.value, temperature=_TEMPERATURE.value,
                guidance_scale=_GUIDANCE.value, seed=_SEED.value, num_steps=_NUM_STEPS.value,
                choice_temperature=_CHOICE_TEMPERATURE.value,
                guidance_schedule=_GUIDANCE_SCHEDULE.value, guidance_power=_GUIDANCE_POWER.value,
                guidance_interval=(lo, hi))
