"""The convolutional pieces shared by the VQGAN encoder and decoder.

Layout and parameter names follow taming-transformers' ``diffusionmodules/model.py``
(Esser et al. 2021, itself after Ho et al. 2020's DDPM UNet), so a taming state_dict maps onto
these modules one tensor per tensor: ``norm1``, ``conv1``, ``norm2``, ``conv2``,
``nin_shortcut`` in a ResnetBlock; ``norm``, ``q``, ``k``, ``v``, ``proj_out`` in an AttnBlock;
``conv`` in Down/Upsample.

All activations are NHWC. ``dtype`` is the compute dtype; parameters are always float32 and
GroupNorm statistics are reduced in float32. Every parameter carries logical axis names
(``conv_h, conv_w, conv_in, conv_out`` for kernels, ``conv_out`` for biases, ``norm`` for
GroupNorm scale and bias) for the mesh rules in :mod:`vqgan_jax.parallel`. Block outputs are
constrained to ``ACTIVATION_AXES`` (batch split over the data axes) when a step is traced
under logical-axis rules and a mesh; elsewhere the constraint is a no-op.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)), which
# is variance scaling 1/3 on fan_in; taming trains from it, so we start from the same place.
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
ACTIVATION_AXES = ("activation_batch", None, None, None)   # NHWC activations


def constrain(x: jax.Array) -> jax.Array:
    """``x: [B, H, W, C]`` with its batch axis laid out by the ``activation_batch`` rule."""
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def channel_sum(g: jax.Array) -> jax.Array:
    """``g: [..., C] -> float32[C]``, the sum over every axis but the last, as a vector-matrix
    product: XLA:CPU runs dots multithreaded and vectorised, and this sum (a conv bias's
    gradient) 6-12x faster than as a reduction at the sizes of a VQGAN's feature maps."""
    c = g.shape[-1]
    return jnp.dot(jnp.ones((g.size // c,), g.dtype), g.reshape(-1, c),
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` (bias broadcast over the last axis, cast to y's dtype); its gradient with
    respect to ``bias`` is :func:`channel_sum` of the output gradient."""
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
    return g, channel_sum(g).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Conv(nn.Module):
    """``nn.Conv(features, (k, k), strides=(s, s), padding)`` with the same parameters
    (``kernel [k, k, C_in, features]``, ``bias [features]``, float32, taming's init, logical
    axis names), computed in ``dtype``, the bias added by :func:`add_bias`.

    Call: ``x: [B, H, W, C_in] -> [B, H', W', features]``.
    """
    features: int
    kernel_size: int
    stride: int = 1
    padding: Any = "SAME"
    dtype: Dtype = jnp.float32

    def parameters(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """``(kernel [k, k, in_features, features], bias [features])``, float32."""
        k = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(_torch_conv_init, KERNEL_AXES),
                            (k, k, in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("conv_out",)),
                          (self.features,), jnp.float32)
        return kernel, bias

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.parameters(x.shape[-1])
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return add_bias(y, bias)


def conv(features: int, kernel_size: int, *, stride: int = 1, padding: Any = "SAME",
         dtype: Dtype = jnp.float32, name: str | None = None) -> Conv:
    """A 2-D convolution with taming's init and logical axis names on its parameters."""
    return Conv(features, kernel_size, stride, padding, dtype, name=name)


def _spatial_sum_dot(x: jax.Array) -> jax.Array:
    """``x: [B, S, C] -> [B, C]`` (float32 or wider), the sum over S as B vector-matrix
    products."""
    return jnp.einsum("bsc,bs->bc", x, jnp.ones(x.shape[:2], x.dtype),
                      precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


def _broadcast(m: jax.Array, size: int) -> jax.Array:
    """``m: [B, C] -> [B, size, C]``, each row repeated over the middle axis."""
    return jnp.broadcast_to(m[:, None, :], (m.shape[0], size, m.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _spatial_sum_cpu(x: jax.Array, size: int, dtype: Any) -> jax.Array:
    return _spatial_sum_dot(x)


def _spatial_sum_cpu_fwd(x, size, dtype):
    return _spatial_sum_dot(x), None


def _spatial_sum_cpu_bwd(size, dtype, _, g):
    return (_broadcast(g, size).astype(dtype),)


_spatial_sum_cpu.defvjp(_spatial_sum_cpu_fwd, _spatial_sum_cpu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _spatial_broadcast_cpu(m: jax.Array, size: int) -> jax.Array:
    return _broadcast(m, size)


def _spatial_broadcast_cpu_fwd(m, size):
    return _broadcast(m, size), None


def _spatial_broadcast_cpu_bwd(size, _, g):
    return (_spatial_sum_dot(g),)


_spatial_broadcast_cpu.defvjp(_spatial_broadcast_cpu_fwd, _spatial_broadcast_cpu_bwd)


def _sums_as_dots() -> bool:
    """Whether :func:`spatial_sum` and :func:`spatial_broadcast` use dots (on CPU)."""
    return jax.default_backend() == "cpu"


def spatial_sum(x: jax.Array) -> jax.Array:
    """``x: [B, S, C] -> [B, C]`` (float32 or wider), the sum over S (GroupNorm's statistics).

    On CPU it is computed as B vector-matrix products, and so is the sum in the gradient of
    :func:`spatial_broadcast`: XLA:CPU emits a reduction over the middle axis of an NHWC map as
    a strided scalar loop (8 ns an element inside a step), and runs dots vectorised and
    multithreaded. Elsewhere it is ``jnp.sum``."""
    if _sums_as_dots():
        return _spatial_sum_cpu(x, x.shape[1], x.dtype)
    return jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=1)


def spatial_broadcast(m: jax.Array, size: int) -> jax.Array:
    """``m: [B, C] -> [B, size, C]``; its gradient is :func:`spatial_sum` of the output's."""
    if _sums_as_dots():
        return _spatial_broadcast_cpu(m, size)
    return _broadcast(m, size)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(num_groups, C, eps, affine=True) over NHWC maps (Wu & He 2018):
    per example and group of C / num_groups channels, ``(x - mean) / sqrt(var + eps) * scale +
    bias`` with mean and variance over (H, W, the group's channels), the variance as
    E[x^2] - E[x]^2 clipped at 0 (as flax's ``nn.GroupNorm``, whose parameters it shares:
    ``scale [C]`` ones, ``bias [C]`` zeros, float32).

    Statistics and the normalization are computed in float32 (float64 for float64 inputs),
    the output cast to ``dtype``.
    The sums over H and W go through :func:`spatial_sum` / :func:`spatial_broadcast`, which
    XLA:CPU runs 2-2.5x faster than flax's GroupNorm, forward and backward (BENCHMARKS.md).

    Call: ``x: [B, H, W, C] -> [B, H, W, C]``.

    Raises:
      ValueError: at trace time, naming ``model.norm_groups``, when C is not a multiple of
        ``num_groups``.
    """
    num_groups: int
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not a multiple of num_groups="
                             f"{self.num_groups}; set model.norm_groups to a divisor of every "
                             "channel count")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("norm",)), (c,), jnp.float32)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(b, h * w, c)
        n = h * w * (c // self.num_groups)
        group_sum = lambda s: s.reshape(b, self.num_groups, -1).sum(-1)
        mean = group_sum(spatial_sum(xf)) / n
        var = jnp.maximum(group_sum(spatial_sum(xf * xf)) / n - mean * mean, 0.0)
        per_channel = lambda v: jnp.repeat(v, c // self.num_groups, axis=1)
        a = per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale
        d = bias - per_channel(mean) * a
        y = xf * spatial_broadcast(a, h * w) + spatial_broadcast(d, h * w)
        return y.reshape(b, h, w, c).astype(self.dtype)


def group_norm(num_groups: int, dtype: Dtype, name: str) -> GroupNorm:
    """torch.nn.GroupNorm(num_groups, C, eps=1e-6, affine=True), statistics in float32."""
    return GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> 3x3 conv, twice, plus a (1x1-projected) shortcut.

    Attributes:
      out_channels: channels of the output; the shortcut is a 1x1 conv ``nin_shortcut`` when
        they differ from the input's.
      dropout: dropout rate between the two convs (taming's VQGAN configs use 0.0).
      norm_groups: GroupNorm groups (32 in taming); must divide both channel counts.

    Call: ``x: [B, H, W, C_in] -> [B, H, W, out_channels]``.
    """
    out_channels: int
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = nn.swish(group_norm(self.norm_groups, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        h = nn.swish(group_norm(self.norm_groups, self.dtype, "norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="nin_shortcut")(x)
        return constrain(x + h)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, with a residual.

    ``q, k, v, proj_out`` are 1x1 convs; scores are scaled by C**-0.5 and the softmax runs in
    float32. Call: ``x: [B, H, W, C] -> [B, H, W, C]``.
    """
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.norm_groups, self.dtype, "norm")(x)
        q, k, v = (conv(c, 1, dtype=self.dtype, name=n)(y).reshape(b, h * w, c)
                   for n in ("q", "k", "v"))
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * c ** -0.5, axis=-1).astype(v.dtype)
        y = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, h, w, c)
        return constrain(x + conv(c, 1, dtype=self.dtype, name="proj_out")(y))


class Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right, then a stride-2 3x3 conv.

    This is taming's asymmetric ``F.pad(x, (0, 1, 0, 1))`` + ``Conv2d(k=3, s=2, p=0)``.
    Call: ``x: [B, H, W, C] -> [B, H // 2, W // 2, C]`` (H, W even).
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, stride=2, padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 'same' conv (taming's
    ``F.interpolate(x, scale_factor=2, mode="nearest")`` + ``Conv2d(k=3, p=1)``).

    Computed sub-pixel, without building the repeated input: each of the four output phases
    (row parity a, column parity b) of ``conv3x3(repeat2(x))`` is a 2x2 conv of ``x`` itself
    whose taps are sums of the 3x3 kernel's taps (phase 0 reads offsets -1, 0 with taps
    ``k[0], k[1] + k[2]``; phase 1 reads 0, +1 with ``k[0] + k[1], k[2]``), and the phases are
    interleaved. Same result up to float32 rounding of the summed taps (tests/test_vqgan.py
    checks it against the repeat-then-conv definition), 16 instead of 36 multiply-adds per input
    position and channel pair. The parameters are the 3x3 kernel and bias of a submodule
    ``conv``, as in taming.

    Call: ``x: [B, H, W, C] -> [B, 2H, 2W, C]``.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _NearestUpsampleConv(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)


def _phase_taps(k: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The two 2-tap kernels (phase 0, phase 1) along ``axis`` of a 3-tap kernel ``k``."""
    t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
    return jnp.stack([t0, t1 + t2], axis), jnp.stack([t0 + t1, t2], axis)


class _NearestUpsampleConv(Conv):
    """``conv3x3(repeat2(x))`` as four 2x2 phase convs; a 3x3 :class:`Conv`'s parameters."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.parameters(x.shape[-1])
        pads = ((1, 0), (0, 1))       # phase 0 reads rows i-1, i; phase 1 reads rows i, i+1
        rows = []
        for a, k_a in enumerate(_phase_taps(kernel, 0)):
            cols = [jax.lax.conv_general_dilated(
                        x.astype(self.dtype), k_ab.astype(self.dtype), (1, 1), (pads[a], pads[b]),
                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
                    for b, k_ab in enumerate(_phase_taps(k_a, 1))]
            rows.append(jnp.stack(cols, axis=3))                      # [B, H, W, 2, C]
        y = jnp.stack(rows, axis=2)                                   # [B, H, 2, W, 2, C]
        b_, h, _, w, _, c = y.shape
        return add_bias(y.reshape(b_, 2 * h, 2 * w, c), bias)
