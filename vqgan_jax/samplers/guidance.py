"""Classifier-free guidance (Ho & Salimans 2021) and schedules of its scale over sampling steps.

:func:`guide` mixes the conditional and unconditional logits of a doubled batch
``[cond; uncond]``: ``u + s * (c - u)``. :class:`GuidanceSchedule` gives the scale ``s`` at each
step from the step's progress ``p`` in [0, 1] (0 at the first step, 1 at the last):

* ``"constant"``: ``s`` at every step (Ho & Salimans 2021; the default);
* ``"linear"``: ``1 + (s - 1) * p``, from 1 at the first step to ``s`` at the last (MUSE,
  Chang et al. 2023; MAR, Li et al. 2024);
* ``"power_cosine"``: ``1 + (s - 1) * (1 - cos(pi * p ** power)) / 2`` (RAR, Yu et al. 2024);
* ``"interval"``: ``s`` for ``p`` in ``[lo, hi]``, 1 elsewhere (Kynkaanniemi et al. 2024;
  LlamaGen's ``cfg_interval``).

Every schedule gives 1 at ``s = 1``, so a scale of 1 always samples the conditional model.
The schedule is a pytree whose only leaf is ``scale``: passed to a jitted function as an
ordinary argument, each ``kind``/``power``/``interval`` compiles once and the scale is traced;
with a Python float scale it is also hashable and can be a static argument.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

KINDS = ("constant", "linear", "power_cosine", "interval")


def guide(logits: jax.Array, scale: float | jax.Array | None) -> jax.Array:
    """Classifier-free guidance on a doubled batch (Ho & Salimans 2021, eq. 6 in logit form).

    Args:
      logits: float[2B, ...]: the conditional rows first, then the unconditional ones.
      scale: s in ``u + s * (c - u)``: 1 gives the conditional logits, 0 the unconditional
        ones; None returns ``logits`` unchanged (no guidance, batch not doubled).

    Returns:
      float[B, ...] guided logits (or ``logits`` itself for ``scale=None``).
    """
    if scale is None:
        return logits
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + scale * (cond - uncond)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    """The guidance scale as a function of sampling progress (see the module docstring).

    Attributes:
      kind: one of :data:`KINDS`.
      scale: s, the guidance scale the schedule reaches (any real; 1 is no guidance).
      power: the exponent of ``"power_cosine"``; > 0 (1 is a plain half cosine; larger values
        keep the scale near 1 longer).
      interval: (lo, hi) with ``0 <= lo <= hi <= 1``: the progress range of ``"interval"``.

    Raises:
      ValueError: naming the field for an unknown kind, ``power <= 0``, or an interval outside
        [0, 1] or with ``lo > hi``.
    """
    kind: str = dataclasses.field(default="constant", metadata=dict(static=True))
    scale: float | jax.Array = 1.0
    power: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    interval: tuple[float, float] = dataclasses.field(default=(0.0, 1.0),
                                                      metadata=dict(static=True))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not a guidance schedule; use one of "
                             f"{', '.join(KINDS)}.")
        try:
            power_ok = float(self.power) > 0 and math.isfinite(float(self.power))
        except (TypeError, ValueError):
            power_ok = False
        if not power_ok:
            raise ValueError(f"power={self.power!r}: the power_cosine exponent must be a "
                             "finite number > 0 (1.0 is a plain half cosine).")
        try:
            lo, hi = (float(v) for v in self.interval)
        except (TypeError, ValueError):
            raise ValueError(f"interval={self.interval!r}: give (lo, hi), two numbers with "
                             "0 <= lo <= hi <= 1.") from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"interval={self.interval!r}: give (lo, hi) with "
                             "0 <= lo <= hi <= 1 (progress 0 is the first step, 1 the last).")
        object.__setattr__(self, "interval", (lo, hi))  # hashable, whatever sequence came in

    def scale_at(self, progress: float | jax.Array) -> jax.Array:
        """The guidance scale at a step (traceable).

        Args:
          progress: float[] (or any shape) in [0, 1]: 0 at the first sampling step, 1 at the
            last (values outside are clipped).

        Returns:
          float32 of ``progress``'s shape; for ``"constant"`` the scale itself, unchanged
          (float32[]), so constant guidance computes exactly what an unscheduled scale does.
        """
        scale = jnp.asarray(self.scale, jnp.float32)
        if self.kind == "constant":
            return scale
        p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
        if self.kind == "linear":
            return 1.0 + (scale - 1.0) * p
        if self.kind == "power_cosine":
            return 1.0 + (scale - 1.0) * (1.0 - jnp.cos(jnp.pi * p ** self.power)) / 2.0
        lo, hi = self.interval
        return jnp.where((p >= lo) & (p <= hi), scale, jnp.ones_like(p))
