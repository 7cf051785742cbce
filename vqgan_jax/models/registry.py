"""Config -> models (:func:`build_models` for stage 1, :func:`build_transformer` and
:func:`build_maskgit` for stage 2): trainers, evaluation, sampling, interop and the public API
all build their modules here."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from vqgan_jax.models import quantizers
from vqgan_jax.models.discriminators import NLayerDiscriminator, StyleGANDiscriminator
from vqgan_jax.models.gpt import GPT
from vqgan_jax.models.maskgit import MaskGIT
from vqgan_jax.models.vit_vqgan import ViTVQModel
from vqgan_jax.models.vqgan import VQModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.arch -> tokenizer class (its fields are config.model).
ARCHS = {"vqgan": VQModel, "vit_vqgan": ViTVQModel}
# config.disc.kind -> discriminator class and the config.disc fields it takes.
DISCS = {
    "patchgan": (NLayerDiscriminator, ("ndf", "n_layers")),
    "stylegan": (StyleGANDiscriminator, ("channel_base", "channel_max", "mbstd_group_size",
                                         "mbstd_num_features")),
}
Tokenizer = VQModel | ViTVQModel
Discriminator = NLayerDiscriminator | StyleGANDiscriminator
CONDITIONINGS = ("unconditional", "class", "image")


def build_models(config: ml_collections.ConfigDict) -> tuple[Tokenizer, Discriminator]:
    """The tokenizer and discriminator described by a stage-1 config.

    ``config.arch`` picks the tokenizer class (:data:`ARCHS`), built from ``config.model``;
    ``config.disc.kind`` the discriminator (:data:`DISCS`), built from its fields of
    ``config.disc``; both compute in ``config.dtype`` (:data:`DTYPES`). Saved configs of older
    releases get these fields from :func:`vqgan_jax.workdir.upgrade_config`.

    Raises:
      KeyError: for an unknown arch, disc kind or dtype (the trainers' config check names the
        field first).
    """
    dtype = DTYPES[config.dtype]
    vq = ARCHS[config.arch](
        **config.model.to_dict(), resolution=config.image_size, dtype=dtype,
        quantizer=quantizers.quantizer_spec(config.get("quantizer")))
    disc_cls, fields = DISCS[config.disc.kind]
    disc = disc_cls(**{k: config.disc[k] for k in fields}, dtype=dtype)
    return vq, disc


def eval_params_field(config: ml_collections.ConfigDict) -> str:
    """The stage-1 TrainState field to evaluate and sample with for a run of ``config`` (a
    saved config of a stage-1 workdir): ``"g_ema_params"`` if it kept a generator EMA
    (``config.loss.ema_decay > 0``), else ``"g_params"``."""
    return "g_ema_params" if config.loss.ema_decay > 0 else "g_params"


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The prefix tokens of each conditioning mode (taming's cond stage).

    * ``unconditional``: one start token (sos) ``V``.
    * ``class``: the class token ``V + c`` for ``c`` in ``[0, num_classes)``; ``V + num_classes``
      is the null class of classifier-free guidance.
    * ``image``: the cond-stage tokenizer's codes of the condition image, offset by ``V``.

    Attributes:
      kind: one of :data:`CONDITIONINGS`.
      vocab_size: V, the number of image codes.
      num_classes: class ids (class mode).
      cond_vocab_size: the cond-stage codebook size (image mode).
      cond_grid: the condition's code grid (image mode).
    """
    kind: str
    vocab_size: int
    num_classes: int = 0
    cond_vocab_size: int = 0
    cond_grid: tuple[int, int] = (0, 0)

    @property
    def n_cond_tokens(self) -> int:
        return {"unconditional": 1, "class": self.num_classes + 1,
                "image": self.cond_vocab_size}[self.kind]

    @property
    def prefix_length(self) -> int:
        return math.prod(self.cond_grid) if self.kind == "image" else 1

    def sos_prefix(self, batch_size: int) -> jax.Array:
        """int32[B, 1]: the start token (unconditional mode)."""
        return jnp.full((batch_size, 1), self.vocab_size, jnp.int32)

    def class_prefix(self, class_ids: jax.Array) -> jax.Array:
        """int[B] class ids in [0, num_classes) -> int32[B, 1] class tokens."""
        return (self.vocab_size + jnp.asarray(class_ids, jnp.int32))[:, None]

    def null_prefix(self, batch_size: int) -> jax.Array:
        """int32[B, 1]: the null class token (class mode, classifier-free guidance)."""
        return jnp.full((batch_size, 1), self.vocab_size + self.num_classes, jnp.int32)

    def image_prefix(self, cond_codes: jax.Array) -> jax.Array:
        """int[B, h, w] cond-stage codes -> int32[B, h*w] tokens."""
        return self.vocab_size + cond_codes.reshape(cond_codes.shape[0], -1).astype(jnp.int32)


def build_transformer(config: ml_collections.ConfigDict, vq: Tokenizer,
                      cond_vq: Tokenizer | None = None) -> tuple[GPT, Conditioning]:
    """The GPT of a stage-2 config over ``vq``'s codes (``config.model`` fields, compute dtype
    ``config.dtype``) and its :class:`Conditioning` (``config.conditioning``; in image mode the
    condition is ``cond_vq``'s code grid of a ``config.cond_image_size`` image)."""
    cond_grid = (0, 0)
    if config.conditioning == "image":
        side = config.cond_image_size // cond_vq.downsample_factor
        cond_grid = (side, side)
    conditioning = Conditioning(
        config.conditioning, vq.n_embed, num_classes=config.num_classes,
        cond_vocab_size=cond_vq.n_embed if cond_vq else 0, cond_grid=cond_grid)
    gpt = GPT(vocab_size=vq.n_embed, n_cond_tokens=conditioning.n_cond_tokens,
              dtype=DTYPES[config.dtype], **config.model.to_dict())
    return gpt, conditioning


def build_maskgit(config: ml_collections.ConfigDict, vq: Tokenizer) -> MaskGIT:
    """The :class:`MaskGIT` of a ``stage="maskgit"`` config over ``vq``'s codes.

    ``vocab_size`` is ``vq.n_embed``; ``seq_len`` is ``(config.image_size / f) ** 2`` for the
    tokenizer's downsampling factor ``f``; ``num_classes`` is ``config.num_classes`` in class
    mode and 0 when ``config.conditioning == "unconditional"``; the other fields come from
    ``config.model``, the compute dtype from ``config.dtype``. (The trainer's
    :func:`vqgan_jax.state.maskgit.validate_config` checks the fields first.)
    """
    side = config.image_size // vq.downsample_factor
    num_classes = config.num_classes if config.conditioning == "class" else 0
    return MaskGIT(vocab_size=vq.n_embed, seq_len=side * side, num_classes=num_classes,
                   dtype=DTYPES[config.dtype], **config.model.to_dict())
