"""The convolutional VQGAN tokenizer (Esser et al. 2021, "Taming Transformers", sec. 3.1).

``x -> Encoder -> quant_conv -> z_e -> quantizer -> z_q -> post_quant_conv -> Decoder
-> x_hat``. The layout is taming-transformers' ``VQModel`` parameter for parameter; submodule
names turn taming's dotted keys into flax paths by joining ``down.i.block.j`` /
``down.i.attn.j`` / ``down.i.downsample`` (and ``up.*``) into one module name
``down_i_block_j`` / ``down_i_attn_j`` / ``down_i_downsample``
(e.g. ``encoder.down.1.block.0.conv1.weight`` -> ``encoder/down_1_block_0/conv1/kernel``);
:mod:`vqgan_jax.interop.taming` converts checkpoints both ways.
"""

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.blocks import AttnBlock, Downsample, ResnetBlock, Upsample, conv, group_norm
from vqgan_jax.models.quantizers import QuantizerSpec, VQSpec

Dtype = Any


@functools.cache
def _blocks(remat: bool) -> tuple[type[ResnetBlock], type[AttnBlock]]:
    """ResnetBlock and AttnBlock, wrapped in ``nn.remat`` when ``remat`` (the parameter tree is
    the same either way; ``train``, ResnetBlock's 2nd call argument, stays static)."""
    if not remat:
        return ResnetBlock, AttnBlock
    return nn.remat(ResnetBlock, static_argnums=(2,)), nn.remat(AttnBlock)


class _Mid(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution."""
    channels: int
    dropout: float
    norm_groups: int
    dtype: Dtype
    remat: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        kw = dict(dropout=self.dropout, norm_groups=self.norm_groups, dtype=self.dtype)
        resnet, attn = _blocks(self.remat)
        h = resnet(self.channels, **kw, name="block_1")(h, train)
        h = attn(self.norm_groups, self.dtype, name="attn_1")(h)
        return resnet(self.channels, **kw, name="block_2")(h, train)


class Encoder(nn.Module):
    """Image -> latent grid. ``x: [B, H, W, in_channels] -> [B, H/f, W/f, z_channels]``.

    f = 2 ** (len(ch_mult) - 1). Level i has ``num_res_blocks`` ResnetBlocks of
    ``ch * ch_mult[i]`` channels, each followed by an AttnBlock when the level's resolution
    (``resolution / 2**i``) is in ``attn_resolutions``, then a Downsample (not after the last).
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dropout=self.dropout, norm_groups=self.norm_groups, dtype=self.dtype)
        ResnetBlock, AttnBlock = _blocks(self.remat)  # noqa: N806 (classes)
        h = conv(self.ch, 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, **kw, name=f"down_{i}_block_{j}")(h, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.norm_groups, self.dtype, name=f"down_{i}_attn_{j}")(h)
            if i != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
                res //= 2
        h = _Mid(h.shape[-1], self.dropout, self.norm_groups, self.dtype, self.remat,
                 name="mid")(h, train)
        h = nn.swish(group_norm(self.norm_groups, self.dtype, "norm_out")(h))
        return conv(self.z_channels, 3, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
    """Latent grid -> image. ``z: [B, h, w, z_channels] -> [B, h*f, w*f, out_ch]``.

    Mirror of the Encoder with ``num_res_blocks + 1`` ResnetBlocks per level, levels visited
    from the deepest up, an Upsample after every level but the top one.
    :meth:`features` returns the input of the last layer ``conv_out`` (needed for the
    adaptive GAN weight, Esser et al. 2021 eq. 7).
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 256
    out_ch: int = 3
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        kw = dict(dropout=self.dropout, norm_groups=self.norm_groups, dtype=self.dtype)
        ResnetBlock, AttnBlock = _blocks(self.remat)  # noqa: N806 (classes)
        n = len(self.ch_mult)
        block_in = self.ch * self.ch_mult[-1]
        res = self.resolution // 2 ** (n - 1)
        self.conv_in = conv(block_in, 3, dtype=self.dtype)
        self.mid = _Mid(block_in, self.dropout, self.norm_groups, self.dtype, self.remat)
        levels = []
        for i in reversed(range(n)):
            blocks = [ResnetBlock(self.ch * self.ch_mult[i], **kw, name=f"up_{i}_block_{j}")
                      for j in range(self.num_res_blocks + 1)]
            attns = [AttnBlock(self.norm_groups, self.dtype, name=f"up_{i}_attn_{j}")
                     for j in range(self.num_res_blocks + 1)] if res in self.attn_resolutions else []
            upsample = Upsample(self.dtype, name=f"up_{i}_upsample") if i != 0 else None
            levels.append((blocks, attns, upsample))
            if i != 0:
                res *= 2
        self.levels = levels
        self.norm_out = group_norm(self.norm_groups, self.dtype, "norm_out")
        self.conv_out = conv(self.out_ch, 3, dtype=self.dtype)

    def features(self, z: jax.Array, train: bool = False) -> jax.Array:
        """Everything up to the last layer: ``[B, h, w, z_channels] -> [B, H, W, ch*ch_mult[0]]``."""
        h = self.mid(self.conv_in(z.astype(self.dtype)), train)
        for blocks, attns, upsample in self.levels:
            for j, block in enumerate(blocks):
                h = block(h, train)
                if attns:
                    h = attns[j](h)
            if upsample is not None:
                h = upsample(h)
        return nn.swish(self.norm_out(h))

    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        return self.conv_out(self.features(z, train))


class VQModel(nn.Module):
    """The VQGAN tokenizer: taming-transformers' ``VQModel`` (Esser et al. 2021).

    Attributes:
      ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, dropout: the
        Encoder/Decoder layout (see :class:`Encoder`). ``resolution`` is the training image
        size, used only to decide where attention sits.
      embed_dim: code dimension; ``quant_conv`` (1x1) maps z_channels -> embed_dim and
        ``post_quant_conv`` (1x1) back.
      n_embed: codebook size.
      beta: commitment weight of the VQ loss.
      l2_normalize_codes: l2-normalize codes and encoder outputs before lookup.
      quantizer: the kind and its settings (``quantizers.quantizer_spec(config.quantizer)``),
        the submodule ``quantize``; plain VQ's parameters are exactly taming's.
      norm_groups: GroupNorm groups (32 in taming).
      remat: rematerialize every ResnetBlock and AttnBlock in the backward pass (same
        parameters and results; less activation memory for about one more forward pass).
      dtype: compute dtype (parameters are float32; quantizer distances run in float32).

    Images are float[B, H, W, 3] in [-1, 1] with H, W divisible by f = 2**(len(ch_mult)-1);
    codes are int32[B, H/f, W/f] in [0, n_embed).
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    resolution: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    beta: float = 0.25
    l2_normalize_codes: bool = False
    dropout: float = 0.0
    norm_groups: int = 32
    quantizer: QuantizerSpec = VQSpec()
    dtype: Dtype = jnp.float32
    remat: bool = False

    # Parameter path of the decoder's last layer (its "kernel" is W in the adaptive weight).
    last_layer_path: ClassVar[tuple[str, ...]] = ("decoder", "conv_out")

    def setup(self):
        layout = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), z_channels=self.z_channels,
                      resolution=self.resolution, dropout=self.dropout,
                      norm_groups=self.norm_groups, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(**layout)
        self.decoder = Decoder(**layout)
        self.quant_conv = conv(self.embed_dim, 1, dtype=self.dtype)
        self.post_quant_conv = conv(self.z_channels, 1, dtype=self.dtype)
        self.quantize = self.quantizer.make(self.n_embed, self.embed_dim, self.beta,
                                            self.l2_normalize_codes, self.dtype)

    @property
    def downsample_factor(self) -> int:
        """f: image side / code-grid side."""
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x: jax.Array, train: bool = False, step: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x: [B, H, W, 3] in [-1, 1] -> (z_q: [B, H/f, W/f, embed_dim], aux)``.

        ``step`` (int32 scalar, the train step) reaches the quantizer (Gumbel temperature).
        aux: ``z_e`` (the pre-quantization vectors) and the quantizer's aux
        (indices, codebook_loss, commitment_loss, vq_loss, perplexity, codebook_usage, and
        the kind's own terms; :mod:`vqgan_jax.models.quantizers`).
        """
        z_e = self.quant_conv(self.encoder(x, train))
        z_q, aux = self.quantize(z_e, train, step)
        return z_q, dict(aux, z_e=z_e)

    def decoder_features(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """The decoder up to (not including) its last layer ``conv_out``."""
        return self.decoder.features(self.post_quant_conv(z_q), train)

    def last_layer(self, h: jax.Array) -> jax.Array:
        """The decoder's last layer ``conv_out``: :meth:`decoder_features` output -> image."""
        return self.decoder.conv_out(h)

    def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
        """``z_q: [B, h, w, embed_dim] -> x_hat: [B, h*f, w*f, 3]`` (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z_q), train)

    def encode_to_indices(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, 3] in [-1, 1] -> int32[B, H/f, W/f]`` code indices."""
        return self.encode(x)[1]["indices"]

    def decode_from_indices(self, indices: jax.Array) -> jax.Array:
        """``int[B, h, w]`` in [0, n_embed) -> images ``[B, h*f, w*f, 3]``."""
        return self.decode(self.quantize.lookup(indices))

    def __call__(self, x: jax.Array, train: bool = False, step: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruct: ``x -> (x_hat, aux)`` with aux as in :meth:`encode`, plus ``z_q``."""
        z_q, aux = self.encode(x, train, step)
        return self.decode(z_q, train), dict(aux, z_q=z_q)
