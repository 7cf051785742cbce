"""The ViT-VQGAN tokenizer (Yu et al. 2021, "Vector-quantized Image Modeling with Improved
VQGAN", sec. 3).

``x -> patches (p x p) -> ViTEncoder -> quant_proj -> z_e (embed_dim, e.g. 32) -> l2-normalized
VectorQuantizer -> z_q -> post_quant_proj -> ViTDecoder -> patches -> x_hat``.

* Encoder (sec. 3.1): non-overlapping p x p patches, a linear patch embedding plus a learned
  position embedding, pre-LayerNorm transformer blocks (multi-head self-attention, GELU MLP),
  a final LayerNorm and a 2-layer MLP with a tanh in the middle.
* Factorized codes (sec. 3.2): ``quant_proj`` (Dense width -> embed_dim) into a low-dimensional
  lookup space where both the vectors and the codebook are l2-normalized; ``post_quant_proj``
  (Dense embed_dim -> width) back.
* Decoder: the encoder mirrored: the same blocks on the code grid, a final LayerNorm, Dense to
  ``mlp_dim``, tanh, and the last layer ``to_pixels`` (Dense mlp_dim -> p * p * 3), reshaped
  into pixels.

Windows: attention runs within windows of the training grid (``resolution / patch_size`` on a
side), the position table's size. An image or code grid of that size is one window, as in the
paper; a larger one (full-size held-out photos, large samples) is edge-padded to a multiple
of the window, each window is processed independently, and the result is cropped back. The
model thus never sees a sequence longer than in training, and memory stays bounded.

The blocks are :mod:`vqgan_jax.models.transformer_layers`' (the GPT's too). Parameters carry
logical axes (``embed``, ``heads``, ``mlp``; ``None`` on pixel and position axes;
``codebook_d`` on the code dimension). Each block's output ``[N, T, width]`` has its (window)
batch axis laid out by the ``activation_batch`` rule when a step is traced under sharding
rules (a no-op elsewhere).
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.quantizers import QuantizerSpec, VQSpec
from vqgan_jax.models.transformer_layers import Block, dense, layer_norm

Dtype = Any

_POS_INIT = nn.initializers.normal(stddev=0.02)
TOKEN_AXES = ("activation_batch", None, None)   # [N, T, width] token activations

# The paper's transformer sizes (Yu et al. 2021, table 1).
VIT_SIZES = {
    "small": dict(layers=8, width=512, heads=8, mlp_dim=2048),
    "base": dict(layers=12, width=768, heads=12, mlp_dim=3072),
    "large": dict(layers=32, width=1280, heads=16, mlp_dim=5120),
}


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H/p, W/p, p*p*C]``, each patch flattened (row, column, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def unpatchify(t: jax.Array, p: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, h, w, p*p*C] -> [B, h*p, w*p, C]``."""
    b, h, w, d = t.shape
    c = d // (p * p)
    t = t.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return t.reshape(b, h * p, w * p, c)


def to_windows(t: jax.Array, g: int) -> jax.Array:
    """``[B, h, w, C] -> [B * ceil(h/g) * ceil(w/g), g*g, C]``: edge-padded to multiples of g,
    cut into g x g windows (row-major), each flattened to a sequence."""
    b, h, w, c = t.shape
    nh, nw = -(-h // g), -(-w // g)
    t = jnp.pad(t, ((0, 0), (0, nh * g - h), (0, nw * g - w), (0, 0)), mode="edge")
    t = t.reshape(b, nh, g, nw, g, c).transpose(0, 1, 3, 2, 4, 5)
    return t.reshape(b * nh * nw, g * g, c)


def from_windows(t: jax.Array, shape: tuple[int, int, int], g: int) -> jax.Array:
    """Inverse of :func:`to_windows`: ``[B * nh * nw, g*g, C]`` -> ``[B, h, w, C]`` with
    ``shape = (B, h, w)`` (the padding is cropped)."""
    b, h, w = shape
    nh, nw = -(-h // g), -(-w // g)
    c = t.shape[-1]
    t = t.reshape(b, nh, nw, g, g, c).transpose(0, 1, 3, 2, 4, 5)
    return t.reshape(b, nh * g, nw * g, c)[:, :h, :w]


class _Transformer(nn.Module):
    """Position embedding + ``layers`` blocks + final LayerNorm over ``[N, g*g, width]``."""
    grid: int
    layers: int
    width: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
        # train (4th call argument after self) stays static under remat.
        block = nn.remat(Block, static_argnums=(4,)) if self.remat else Block
        pos = self.param("pos_embedding", nn.with_logical_partitioning(_POS_INIT, (None, "embed")),
                         (self.grid * self.grid, self.width), jnp.float32)
        h = h + jnp.asarray(pos).astype(self.dtype)[None]
        for i in range(self.layers):
            h = block(self.heads, self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                      name=f"block_{i}")(h, None, 0, train)[0]
            h = nn.with_logical_constraint(h, TOKEN_AXES)
        return layer_norm(self.dtype, "ln_f", 1e-6)(h)


class ViTEncoder(nn.Module):
    """Image -> token grid: ``x: [B, H, W, 3] -> [B, H/p, W/p, width]`` (H, W multiples of p).

    Parameters: ``patch_embed`` (Dense p*p*3 -> width), ``transformer`` (position table
    ``[grid**2, width]``, blocks ``block_i``, ``ln_f``), ``head_fc`` (Dense width -> mlp_dim),
    tanh, ``head_out`` (Dense mlp_dim -> width).
    """
    patch_size: int
    grid: int
    layers: int
    width: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        t = patchify(x.astype(self.dtype), self.patch_size)  # (B, h, w, p*p*3)
        shape = t.shape[:3]
        h = dense(self.width, (None, "embed"), self.dtype, "patch_embed")(to_windows(t, self.grid))
        h = _Transformer(self.grid, self.layers, self.width, self.heads, self.mlp_dim,
                         self.dropout, self.dtype, self.remat, name="transformer")(h, train)
        h = jnp.tanh(dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "head_fc")(h))
        h = dense(self.width, ("mlp", "embed"), self.dtype, "head_out")(h)
        return from_windows(h, shape, self.grid)


class ViTDecoder(nn.Module):
    """Token grid -> image: ``z: [B, h, w, width] -> [B, h*p, w*p, 3]``.

    Parameters: ``transformer`` (as the encoder's), ``head_fc`` (Dense width -> mlp_dim), tanh,
    and the last layer ``to_pixels`` (Dense mlp_dim -> p*p*3). :meth:`features` stops before
    ``to_pixels`` (for the adaptive GAN weight, Esser et al. 2021 eq. 7).
    """
    patch_size: int
    grid: int
    layers: int
    width: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    out_ch: int = 3
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        self.transformer = _Transformer(self.grid, self.layers, self.width, self.heads,
                                        self.mlp_dim, self.dropout, self.dtype, self.remat)
        self.head_fc = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "head_fc")
        self.to_pixels = dense(self.patch_size ** 2 * self.out_ch, ("mlp", None), self.dtype,
                               "to_pixels")

    def features(self, z: jax.Array, train: bool = False) -> jax.Array:
        """``[B, h, w, width] -> [B, h, w, mlp_dim]``: everything before ``to_pixels``."""
        shape = z.shape[:3]
        h = self.transformer(to_windows(z.astype(self.dtype), self.grid), train)
        return from_windows(jnp.tanh(self.head_fc(h)), shape, self.grid)

    def last_layer(self, h: jax.Array) -> jax.Array:
        """``to_pixels`` and the reshape: ``[B, h, w, mlp_dim] -> [B, h*p, w*p, out_ch]``."""
        return unpatchify(self.to_pixels(h), self.patch_size)

    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        return self.last_layer(self.features(z, train))


class ViTVQModel(nn.Module):
    """The ViT-VQGAN tokenizer (Yu et al. 2021), with VQModel's interface.

    Attributes:
      patch_size: p, the side of the non-overlapping patches = the downsampling factor f
        (8 in the paper: 256x256 -> 32x32 codes).
      resolution: training image side; the position tables (and attention windows) cover
        ``resolution / patch_size`` tokens a side.
      enc_layers, enc_width, enc_heads, enc_mlp_dim: encoder transformer (table 1: Small
        8 / 512 / 8 / 2048, Base 12 / 768 / 12 / 3072, Large 32 / 1280 / 16 / 5120;
        :data:`VIT_SIZES`).
      dec_layers, dec_width, dec_heads, dec_mlp_dim: decoder transformer, likewise.
      embed_dim: dimension of the factorized, l2-normalized codes (32 in the paper).
      n_embed: codebook size (8192 in the paper).
      beta: commitment weight of the VQ loss.
      dropout: dropout on the residual branches (training only).
      quantizer: the kind and its settings (:func:`vqgan_jax.models.quantizers.quantizer_spec`
        of ``config.quantizer``). vq and ema_vq look up l2-normalized codes; fsq, lfq and
        gumbel have no normalized form.
      remat: rematerialize every transformer block in the backward pass (same parameters
        and results; less activation memory for more compute).
      dtype: compute dtype (parameters are float32; quantizer distances in float32).

    Images are float[B, H, W, 3] in [-1, 1] with H, W divisible by patch_size; codes are
    int32[B, H/p, W/p] in [0, n_embed).
    """
    patch_size: int = 8
    resolution: int = 256
    enc_layers: int = 8
    enc_width: int = 512
    enc_heads: int = 8
    enc_mlp_dim: int = 2048
    dec_layers: int = 8
    dec_width: int = 512
    dec_heads: int = 8
    dec_mlp_dim: int = 2048
    embed_dim: int = 32
    n_embed: int = 8192
    beta: float = 0.25
    dropout: float = 0.0
    quantizer: QuantizerSpec = VQSpec()
    remat: bool = False
    dtype: Dtype = jnp.float32

    # Parameter path of the decoder's last layer (its "kernel" is W in the adaptive weight).
    last_layer_path: ClassVar[tuple[str, ...]] = ("decoder", "to_pixels")

    def setup(self):
        grid = self.resolution // self.patch_size
        self.encoder = ViTEncoder(self.patch_size, grid, self.enc_layers, self.enc_width,
                                  self.enc_heads, self.enc_mlp_dim, self.dropout, self.dtype,
                                  self.remat)
        self.decoder = ViTDecoder(self.patch_size, grid, self.dec_layers, self.dec_width,
                                  self.dec_heads, self.dec_mlp_dim, self.dropout, dtype=self.dtype,
                                  remat=self.remat)
        self.quant_proj = dense(self.embed_dim, ("embed", "codebook_d"), self.dtype, "quant_proj")
        self.post_quant_proj = dense(self.dec_width, ("codebook_d", "embed"), self.dtype,
                                     "post_quant_proj")
        # The paper's factorized codes: vq / ema_vq look up l2-normalized codes (Yu et al. 2021
        # sec. 3.2); the other kinds (fsq, lfq, gumbel) have no normalized form.
        self.quantize = self.quantizer.make(self.n_embed, self.embed_dim, self.beta,
                                            self.quantizer.kind in ("vq", "ema_vq"), self.dtype)

    @property
    def downsample_factor(self) -> int:
        """f: image side / code-grid side (= patch_size)."""
        return self.patch_size

    def encode(self, x: jax.Array, train: bool = False, step: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x: [B, H, W, 3] in [-1, 1] -> (z_q: [B, H/p, W/p, embed_dim], aux)``.

        ``step`` (int32 scalar, the train step) reaches the quantizer (Gumbel temperature).

        aux: ``z_e`` (the projected vectors before normalization and lookup) and the
        quantizer's aux (indices, codebook_loss, commitment_loss, vq_loss, perplexity,
        codebook_usage). z_q is l2-normalized (it is a normalized code).
        """
        z_e = self.quant_proj(self.encoder(x, train))  # (B, h, w, embed_dim)
        z_q, aux = self.quantize(z_e, train, step)
        return z_q, dict(aux, z_e=z_e)

    def decoder_features(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """The decoder up to (not including) its last layer ``to_pixels``:
        ``[B, h, w, embed_dim] -> [B, h, w, dec_mlp_dim]``."""
        return self.decoder.features(self.post_quant_proj(z_q), train)

    def last_layer(self, h: jax.Array) -> jax.Array:
        """``decoder_features`` output -> image ``[B, h*p, w*p, 3]``."""
        return self.decoder.last_layer(h)

    def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """``z_q: [B, h, w, embed_dim] -> x_hat: [B, h*p, w*p, 3]`` (about [-1, 1])."""
        return self.last_layer(self.decoder_features(z_q, train))

    def encode_to_indices(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, 3] in [-1, 1] -> int32[B, H/p, W/p]`` code indices."""
        return self.encode(x)[1]["indices"]

    def decode_from_indices(self, indices: jax.Array) -> jax.Array:
        """``int[B, h, w]`` in [0, n_embed) -> images ``[B, h*p, w*p, 3]``."""
        return self.decode(self.quantize.lookup(indices))

    def __call__(self, x: jax.Array, train: bool = False, step: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruct: ``x -> (x_hat, aux)`` with aux as in :meth:`encode`, plus ``z_q``."""
        z_q, aux = self.encode(x, train, step)
        return self.decode(z_q, train), dict(aux, z_q=z_q)
