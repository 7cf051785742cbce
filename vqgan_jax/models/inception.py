"""Inception-v3 as used for FID and the Inception Score, in Flax.

The network is the one of the FID reference implementation (Heusel et al. 2017, TTUR) as
pytorch-fid ships it: ``FIDInceptionV3`` with the ``pt_inception-2015-12-05`` weights
(``pt_inception-2015-12-05-6726825d.pth``, converted from TensorFlow's 2015-12-05 graph).
It differs from torchvision's ``Inception3`` in three places, which change the features:

* the average pools inside ``Mixed_5b..5d`` (``FIDInceptionA``), ``Mixed_6b..6e``
  (``FIDInceptionC``) and ``Mixed_7b`` (``FIDInceptionE_1``) exclude the zero padding from
  the count (``count_include_pad=False``);
* ``Mixed_7c`` (``FIDInceptionE_2``) pools its last branch with a 3x3 *max* pool;
* the classifier has 1008 outputs (the 2015 graph's classes), not 1000.

Nothing is downloaded: :func:`load_inception_params` reads a file the user supplies, either
the ``.pth`` state_dict itself (needs PyTorch) or an ``.npz`` with the same keys
(:func:`save_inception_npz` writes one). Flax parameter names mirror the state_dict keys:
``Mixed_5b.branch1x1.conv.weight`` is ``params/Mixed_5b/branch1x1/conv/kernel``.

    variables = load_inception_params("pt_inception-2015-12-05-6726825d.pth")
    pool, logits = InceptionV3().apply(variables, images)   # images float32[B, H, W, 3] in [-1, 1]
"""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INPUT_SIZE = 299        # the network's input side, pixels
FEATURE_DIM = 2048      # pool3 features
NUM_CLASSES = 1008      # logits of the 2015 graph
VARIANT = "pt_inception-2015-12-05 (pytorch-fid FIDInceptionV3)"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               "fid_weights/pt_inception-2015-12-05-6726825d.pth")
_BN_EPS = 1e-3


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU.

    Submodules ``conv`` and ``bn``, as torchvision's ``BasicConv2d``.

    Attributes:
      features: output channels.
      kernel: (kh, kw).
      stride: the same in both directions.
      padding: (ph, pw), zeros on both sides.
      dtype: compute dtype; parameters are float32.
    """
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=self.dtype,
                         param_dtype=jnp.float32, name="bn")(x)
        return nn.relu(x)


def _avg_pool(x: Array) -> Array:
    """3x3, stride 1, pad 1 average that ignores the padding (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """``FIDInceptionA`` (Mixed_5b..5d): 35x35 blocks, 64 + 64 + 96 + pool_features channels."""
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda f, k, name, p=(0, 0): BasicConv2d(f, k, padding=p, dtype=self.dtype,
                                                        name=name)
        b1 = conv(64, (1, 1), "branch1x1")(x)
        b5 = conv(48, (1, 1), "branch5x5_1")(x)
        b5 = conv(64, (5, 5), "branch5x5_2", (2, 2))(b5)
        b3 = conv(64, (1, 1), "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), "branch3x3dbl_2", (1, 1))(b3)
        b3 = conv(96, (3, 3), "branch3x3dbl_3", (1, 1))(b3)
        bp = conv(self.pool_features, (1, 1), "branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """``InceptionB`` (Mixed_6a): 35x35 -> 17x17, 384 + 96 + C_in channels."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = BasicConv2d(384, (3, 3), stride=2, dtype=self.dtype, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x).astype(b3.dtype)], axis=-1)


class InceptionC(nn.Module):
    """``FIDInceptionC`` (Mixed_6b..6e): 17x17 blocks with factorised 7x7 convs, 768 channels."""
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7 = self.channels_7x7
        conv = lambda f, k, name, p=(0, 0): BasicConv2d(f, k, padding=p, dtype=self.dtype,
                                                        name=name)
        b1 = conv(192, (1, 1), "branch1x1")(x)
        b7 = conv(c7, (1, 1), "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), "branch7x7_2", (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7_3", (3, 0))(b7)
        bd = conv(c7, (1, 1), "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), "branch7x7dbl_2", (3, 0))(bd)
        bd = conv(c7, (1, 7), "branch7x7dbl_3", (0, 3))(bd)
        bd = conv(c7, (7, 1), "branch7x7dbl_4", (3, 0))(bd)
        bd = conv(192, (1, 7), "branch7x7dbl_5", (0, 3))(bd)
        bp = conv(192, (1, 1), "branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """``InceptionD`` (Mixed_7a): 17x17 -> 8x8, 320 + 192 + C_in channels."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda f, k, name, s=1, p=(0, 0): BasicConv2d(f, k, stride=s, padding=p,
                                                             dtype=self.dtype, name=name)
        b3 = conv(192, (1, 1), "branch3x3_1")(x)
        b3 = conv(320, (3, 3), "branch3x3_2", 2)(b3)
        b7 = conv(192, (1, 1), "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), "branch7x7x3_2", 1, (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7x3_3", 1, (3, 0))(b7)
        b7 = conv(192, (3, 3), "branch7x7x3_4", 2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x).astype(b3.dtype)], axis=-1)


class InceptionE(nn.Module):
    """``FIDInceptionE_1`` (avg pool, Mixed_7b) / ``FIDInceptionE_2`` (max pool, Mixed_7c).

    8x8 blocks, 320 + 768 + 768 + 192 = 2048 channels.
    """
    pool: str  # "avg" | "max"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = lambda f, k, name, p=(0, 0): BasicConv2d(f, k, padding=p, dtype=self.dtype,
                                                        name=name)
        b1 = conv(320, (1, 1), "branch1x1")(x)
        b3 = conv(384, (1, 1), "branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), "branch3x3_2a", (0, 1))(b3),
                              conv(384, (3, 1), "branch3x3_2b", (1, 0))(b3)], axis=-1)
        bd = conv(448, (1, 1), "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), "branch3x3dbl_2", (1, 1))(bd)
        bd = jnp.concatenate([conv(384, (1, 3), "branch3x3dbl_3a", (0, 1))(bd),
                              conv(384, (3, 1), "branch3x3dbl_3b", (1, 0))(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = conv(192, (1, 1), "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's ``FIDInceptionV3`` (Szegedy et al. 2016 architecture; Heusel et al. 2017).

    Input handling is pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``:
    bilinear resize to 299x299 (half-pixel centres, no antialiasing: ``F.interpolate(...,
    mode="bilinear", align_corners=False)``) of images in [-1, 1] (pytorch-fid maps [0, 1] to
    [-1, 1]; the same thing).

    Variables: ``params`` (conv kernels, BatchNorm scale/bias, ``fc``) and ``batch_stats``
    (BatchNorm mean/var), both loaded by :func:`load_inception_params`.

    Attributes:
      dtype: compute dtype (float32 for reported figures); parameters are float32.
    """
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        """Pool features and logits.

        Args:
          x: float[B, H, W, 3] in [-1, 1], RGB, any H, W (resized to 299x299).

        Returns:
          ``(pool, logits)``: float32[B, 2048] pool3 features (the FID features, >= 0) and
          float32[B, 1008] classifier logits (softmax of them: the Inception Score's p(y|x)).
        """
        b = x.shape[0]
        x = x.astype(jnp.float32)
        if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, x.shape[-1]), "bilinear",
                                 antialias=False)
        x = x.astype(self.dtype)
        conv = lambda f, k, name, s=1, p=(0, 0): BasicConv2d(f, k, stride=s, padding=p,
                                                             dtype=self.dtype, name=name)
        x = conv(32, (3, 3), "Conv2d_1a_3x3", 2)(x)       # (B, 149, 149, 32)
        x = conv(32, (3, 3), "Conv2d_2a_3x3")(x)          # (B, 147, 147, 32)
        x = conv(64, (3, 3), "Conv2d_2b_3x3", 1, (1, 1))(x)
        x = _max_pool_s2(x)                               # (B, 73, 73, 64)
        x = conv(80, (1, 1), "Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), "Conv2d_4a_3x3")(x)         # (B, 71, 71, 192)
        x = _max_pool_s2(x)                               # (B, 35, 35, 192)
        x = InceptionA(32, dtype=self.dtype, name="Mixed_5b")(x)   # 256 channels
        x = InceptionA(64, dtype=self.dtype, name="Mixed_5c")(x)   # 288
        x = InceptionA(64, dtype=self.dtype, name="Mixed_5d")(x)   # 288
        x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)       # (B, 17, 17, 768)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, dtype=self.dtype, name=name)(x)
        x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)       # (B, 8, 8, 1280)
        x = InceptionE("avg", dtype=self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", dtype=self.dtype, name="Mixed_7c")(x)  # (B, 8, 8, 2048)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, dtype=jnp.float32, param_dtype=jnp.float32,
                          name="fc")(pool)
        return pool, logits


# ----------------------------------------------------------------------------- weights

@functools.cache
def abstract_variables() -> dict:
    """Shapes and dtypes of :class:`InceptionV3`'s variables (nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


# flax leaf -> (torch suffix, transpose from torch layout to flax layout)
_LEAVES = {
    ("params", "kernel"): "weight",   # conv (O, I, kh, kw) -> (kh, kw, I, O); fc (O, I) -> (I, O)
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The pytorch-fid state_dict key of a flax variable.

    ``("params", ("Mixed_5b", "branch1x1", "conv", "kernel"))`` ->
    ``"Mixed_5b.branch1x1.conv.weight"``.
    """
    return ".".join(path[:-1] + (_LEAVES[(collection, path[-1])],))


def _flat(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    return a.T if a.ndim == 2 else a


def _to_flax_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    return a.T if a.ndim == 2 else a


def to_state_dict(variables: dict) -> dict[str, np.ndarray]:
    """Flax variables -> a pytorch-fid state_dict of float32 numpy arrays (torch layouts)."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flat(dict(variables[collection])).items():
            out[torch_key(collection, path)] = _to_torch_layout(np.asarray(value, np.float32))
    return out


def from_state_dict(state_dict: dict[str, np.ndarray], source: str = "the weights file") -> dict:
    """A pytorch-fid ``FIDInceptionV3`` state_dict -> :class:`InceptionV3` variables.

    Extra keys (``*.num_batches_tracked``) are ignored.

    Raises:
      ValueError: naming the first missing or misshaped key and ``--inception_weights``.
    """
    abstract = abstract_variables()
    variables: dict = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in _flat(dict(abstract[collection])).items():
            key = torch_key(collection, path)
            if key not in state_dict:
                raise ValueError(
                    f"--inception_weights: {source} has no key {key!r}, so it does not hold "
                    f"the FID Inception-v3 weights; pass pytorch-fid's {WEIGHTS_FILE} "
                    f"({WEIGHTS_URL}) or an .npz written from it by save_inception_npz.")
            value = _to_flax_layout(np.asarray(state_dict[key], np.float32))
            if value.shape != leaf.shape:
                expected = _to_torch_layout(np.zeros(leaf.shape, np.float32)).shape
                raise ValueError(
                    f"--inception_weights: {source} key {key!r} has shape "
                    f"{tuple(np.shape(state_dict[key]))}, expected {expected}; it does not hold "
                    f"the FID Inception-v3 weights ({WEIGHTS_FILE}).")
            node = variables.setdefault(collection, {})
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = value
    return variables


def load_inception_params(path: str) -> dict:
    """Load the FID Inception-v3 weights from a file the user supplies (nothing is downloaded).

    Args:
      path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torch state_dict; needs
        PyTorch, loaded with ``weights_only=True`` so no code in the file runs), or an ``.npz``
        holding the same keys in the same (torch) layouts (numpy only).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays for :class:`InceptionV3`.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message says where to get the file).
      ImportError: a ``.pth`` file and PyTorch is not installed.
      ValueError: the file cannot be read as a state_dict, or a key is missing or misshaped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--inception_weights={path} does not exist. Download pytorch-fid's {WEIGHTS_FILE} "
            f"from {WEIGHTS_URL} (or convert it to .npz with save_inception_npz) and pass its "
            "path.")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                state_dict = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"--inception_weights={path} is not a readable .npz file: {e}") from e
    else:
        try:
            import torch  # Optional: only reading a .pth needs it.
        except ImportError as e:
            raise ImportError(
                f"--inception_weights={path}: reading a .pth file needs PyTorch "
                "(`pip install torch`); or convert it once to .npz elsewhere with "
                "vqgan_jax.models.inception.save_inception_npz and pass the .npz.") from e
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  torch raises pickle, runtime and zip errors.
            raise ValueError(f"--inception_weights={path} is not a torch state_dict that loads "
                             f"with weights_only=True: {type(e).__name__}: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"--inception_weights={path} holds a {type(loaded).__name__}, not "
                             "a state_dict.")
        state_dict = {k: v.detach().cpu().numpy() for k, v in loaded.items()
                      if hasattr(v, "detach")}
    return from_state_dict(state_dict, source=path)


def save_inception_npz(variables: dict, path: str) -> None:
    """Write ``variables`` as an ``.npz`` of pytorch-fid state_dict keys (torch layouts).

    ``save_inception_npz(load_inception_params("pt_inception-...pth"), "inception.npz")``
    converts the official file once; the .npz then loads without PyTorch.
    """
    np.savez(path, **to_state_dict(variables))
