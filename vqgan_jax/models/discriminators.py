"""Discriminators: PatchGAN (Isola et al. 2017) as used by VQGAN (Esser et al. 2021), and
StyleGAN2's residual discriminator (Karras et al. 2020) as used by ViT-VQGAN (Yu et al. 2021).

The PatchGAN is a port of taming-transformers' `NLayerDiscriminator`
(taming/modules/discriminator/model.py) with the same layers, paddings and initialisation
(`weights_init`), in NHWC.

Each layer's activations have their batch axis laid out by the ``activation_batch`` rule
(:func:`vqgan_jax.models.blocks.constrain`; a no-op outside a sharded step).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.blocks import constrain

Array = jax.Array

# Logical axis names of the parameters (mapped to mesh axes by the trainer's rules).
CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)


def _normal(mean: float, stddev: float) -> nn.initializers.Initializer:
    """N(mean, stddev^2) initializer (PyTorch `nn.init.normal_`)."""

    def init(key, shape, dtype=jnp.float32):
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


class NLayerDiscriminator(nn.Module):
    """Taming's PatchGAN: per-patch real/fake logits for images in [-1, 1].

    Layers (k4 = 4x4 kernel, pad 1; C(n) = ndf * min(2**n, 8)), named `main_{i}` after index i
    of taming's `nn.Sequential` `main` (LeakyReLUs have no parameters, so no module):

      main_0                    Conv k4 s2, bias    3 -> C(0)         + LeakyReLU(0.2)
      main_{3n-1}, main_{3n}    Conv k4 s2, no bias C(n-1) -> C(n)    + BatchNorm + LeakyReLU(0.2),
                                n = 1 .. n_layers-1
      main_{3L-1}, main_{3L}    Conv k4 s1, no bias C(L-1) -> C(L)    + BatchNorm + LeakyReLU(0.2),
                                L = n_layers
      main_{3L+2}               Conv k4 s1, bias    C(L) -> 1

    For n_layers=3: convs main_0, main_2, main_5, main_8, main_11; BatchNorms main_3, main_6,
    main_9. Converting a taming state dict (PyTorch keys `main.{i}.*`):
      conv  main.{i}.weight [O, I, kh, kw] -> params/main_{i}/kernel = weight.transpose(2, 3, 1, 0)
            main.{i}.bias                  -> params/main_{i}/bias
      norm  main.{i}.weight -> params/main_{i}/scale,   main.{i}.bias -> params/main_{i}/bias,
            main.{i}.running_mean -> batch_stats/main_{i}/mean,
            main.{i}.running_var  -> batch_stats/main_{i}/var   (num_batches_tracked is dropped).

    Init as taming's `weights_init`: conv kernels N(0, 0.02), conv biases 0, BatchNorm scale
    N(1, 0.02), bias 0. BatchNorm matches PyTorch's BatchNorm2d defaults (momentum 0.1, i.e.
    flax momentum 0.9; eps 1e-5), except that flax's running variance is updated with the biased
    batch variance (PyTorch: unbiased). Under jit on a mesh the batch statistics are those of
    the global batch.

    Attributes:
      ndf: channels of the first conv (64 in taming: 2,765,633 parameters with n_layers=3).
      n_layers: number of stride-2 convs (3: 256x256 -> 30x30 logits, 70x70 receptive field).
      dtype: compute dtype; parameters and batch statistics are float32.
    """

    ndf: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32

    def _conv(self, features: int, stride: int, use_bias: bool, index: int) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=stride,
            padding=1,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(_normal(0.0, 0.02), CONV_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
            name=f"main_{index}",
        )

    def _norm(self, train: bool, index: int) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nn.with_logical_partitioning(_normal(1.0, 0.02), NORM_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES),
            name=f"main_{index}",
        )

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        """Patch logits.

        Args:
          x: float[B, H, W, 3] in [-1, 1]; H, W >= 3 * 2**n_layers (24 for n_layers=3).
          train: BatchNorm normalises with batch statistics and updates `batch_stats`
            (apply with `mutable=["batch_stats"]`); False uses the running averages.

        Returns:
          float32[B, h, w, 1] logits (real > 0), h = floor(H / 2**n_layers) - 2, likewise w
          (256 -> 30 with n_layers=3, as in PyTorch).
        """
        x = x.astype(self.dtype)
        x = nn.leaky_relu(self._conv(self.ndf, 2, True, 0)(x), 0.2)
        i = 2  # index in taming's Sequential
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            x = self._conv(self.ndf * min(2**n, 8), stride, False, i)(x)
            x = constrain(nn.leaky_relu(self._norm(train, i + 1)(x), 0.2))
            i += 3
        x = self._conv(1, 1, True, i)(x)  # (B, h, w, 1)
        return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- StyleGAN2

def minibatch_stddev(x: Array, group_size: int = 4, num_features: int = 1) -> Array:
    """Minibatch standard-deviation layer (Karras et al. 2018, sec. 3; StyleGAN2's layout).

    The batch is split into groups of ``G = min(group_size, B)`` images, sample i in group
    ``i % (B / G)`` (StyleGAN2's ``reshape(G, -1, ...)``); channels into ``num_features``
    slices. Per group and slice: the standard deviation over the group (biased, sqrt(var +
    1e-8)) of every pixel and channel, averaged over pixels and channels; the result is
    appended as ``num_features`` constant channels.

    Args:
      x: float[B, H, W, C], B divisible by G, C by num_features.

    Returns:
      float[B, H, W, C + num_features] in x's dtype (statistics in float32).
    """
    b, h, w, c = x.shape
    g = min(group_size, b)
    f = num_features
    y = x.astype(jnp.float32).reshape(g, b // g, h, w, f, c // f)
    y = jnp.sqrt(jnp.mean(jnp.square(y - jnp.mean(y, axis=0)), axis=0) + 1e-8)  # (B/G, h, w, F, c)
    y = jnp.mean(y, axis=(1, 2, 4))                                              # (B/G, F)
    y = jnp.tile(y, (g, 1))[:, None, None, :]                                    # (B, 1, 1, F)
    y = jnp.broadcast_to(y, (b, h, w, f)).astype(x.dtype)
    return jnp.concatenate([x, y], axis=-1)


class EqualizedConv(nn.Module):
    """Conv with equalized learning rate (Karras et al. 2018, sec. 4.1): the kernel is stored
    N(0, 1) and multiplied at run time by ``1 / sqrt(fan_in)`` (fan_in = k * k * C_in), so
    Adam's per-parameter steps move every layer at the same relative speed. Bias zero-init.

    ``x: [B, H, W, C_in] -> [B, H, W, features]`` (SAME padding, stride 1).
    """
    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        fan_in = k * k * x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), CONV_KERNEL_AXES), (k, k, x.shape[-1], self.features),
            jnp.float32)
        w = (jnp.asarray(kernel) * fan_in ** -0.5).astype(self.dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), CONV_BIAS_AXES), (self.features,), jnp.float32)
            y = y + jnp.asarray(bias).astype(self.dtype)
        return y


class EqualizedDense(nn.Module):
    """Dense layer with equalized learning rate: kernel N(0, 1) scaled by 1/sqrt(fan_in)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("embed", "mlp")), (x.shape[-1], self.features),
            jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("mlp",)), (self.features,), jnp.float32)
        w = (jnp.asarray(kernel) * x.shape[-1] ** -0.5).astype(self.dtype)
        return x.astype(self.dtype) @ w + jnp.asarray(bias).astype(self.dtype)


def _lrelu(x: Array) -> Array:
    """StyleGAN2's activation: leaky ReLU(0.2) times sqrt(2) (keeps unit variance)."""
    return nn.leaky_relu(x, 0.2) * jnp.sqrt(2.0).astype(x.dtype)


def _avg_pool2(x: Array) -> Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2's residual discriminator (Karras et al. 2020, fig. 7b and appendix B), as
    ViT-VQGAN uses it (Yu et al. 2021, sec. 3.3). One logit per image.

    Layers, with C(r) = min(channel_base // r, channel_max) channels at resolution r::

      from_rgb                1x1 conv 3 -> C(H) + lrelu
      block_{r} (r = H .. 8)  3x3 conv C(r) -> C(r) + lrelu, 3x3 conv C(r) -> C(r/2) + lrelu,
                              2x2 average pool; skip: 2x2 average pool, 1x1 conv (no bias);
                              out = (main + skip) / sqrt(2)
      minibatch stddev        + mbstd_num_features channels (:func:`minibatch_stddev`)
      conv                    3x3 conv C(4) + F -> C(4) + lrelu
      fc                      dense 16 C(4) -> C(4) + lrelu
      out                     dense C(4) -> 1

    lrelu is leaky ReLU(0.2) * sqrt(2); every conv and dense has an equalized learning rate
    (:class:`EqualizedConv`). Simplification: StyleGAN2 low-pass filters ([1, 3, 3, 1]) before
    its stride-2 convs; we average-pool after the conv instead. No BatchNorm (no
    ``batch_stats``).

    Attributes:
      channel_base, channel_max: the channel schedule (StyleGAN2: 32768 and 512; 256x256 gives
        C = 128, 256, 512, 512, 512, 512, 512).
      mbstd_group_size, mbstd_num_features: minibatch-stddev grouping (4 and 1 in StyleGAN2);
        the batch must be divisible by min(mbstd_group_size, batch).
      dtype: compute dtype; parameters are float32, the logits float32.
    """

    channel_base: int = 32768
    channel_max: int = 512
    mbstd_group_size: int = 4
    mbstd_num_features: int = 1
    dtype: Any = jnp.float32

    def channels(self, resolution: int) -> int:
        return min(self.channel_base // resolution, self.channel_max)

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        """Logits.

        Args:
          x: float[B, H, H, 3] in [-1, 1], H = 4 * 2**k with k >= 1 (square images).
          train: unused (no BatchNorm or dropout); kept for the PatchGAN's signature.

        Returns:
          float32[B, 1] logits (real > 0).
        """
        del train
        res = x.shape[1]
        if x.shape[2] != res or res < 8 or res & (res - 1):
            raise ValueError(f"StyleGANDiscriminator needs square images of side 4 * 2**k >= 8, "
                             f"got {x.shape[1:3]}.")
        kw = dict(dtype=self.dtype)
        h = _lrelu(EqualizedConv(self.channels(res), 1, **kw, name="from_rgb")(x))
        while res > 4:
            c_in, c_out = self.channels(res), self.channels(res // 2)
            y = _lrelu(EqualizedConv(c_in, 3, **kw, name=f"block_{res}_conv0")(h))
            y = _avg_pool2(_lrelu(EqualizedConv(c_out, 3, **kw, name=f"block_{res}_conv1")(y)))
            skip = EqualizedConv(c_out, 1, use_bias=False, **kw,
                                 name=f"block_{res}_skip")(_avg_pool2(h))
            h = constrain((y + skip) * (1.0 / jnp.sqrt(2.0)).astype(y.dtype))
            res //= 2
        h = minibatch_stddev(h, self.mbstd_group_size, self.mbstd_num_features)
        h = _lrelu(EqualizedConv(self.channels(4), 3, **kw, name="conv")(h))
        h = _lrelu(EqualizedDense(self.channels(4), **kw, name="fc")(h.reshape(h.shape[0], -1)))
        return EqualizedDense(1, **kw, name="out")(h).astype(jnp.float32)
