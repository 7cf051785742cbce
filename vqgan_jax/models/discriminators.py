"""PatchGAN discriminator (Isola et al. 2017) as used by VQGAN (Esser et al. 2021).

A port of taming-transformers' `NLayerDiscriminator` (taming/modules/discriminator/model.py)
with the same layers, paddings and initialisation (`weights_init`), in NHWC.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
            x = nn.leaky_relu(self._norm(train, i + 1)(x), 0.2)
            i += 3
        x = self._conv(1, 1, True, i)(x)  # (B, h, w, 1)
        return x.astype(jnp.float32)
