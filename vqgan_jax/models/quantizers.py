"""Vector quantization with a learned codebook (van den Oord et al. 2017, VQ-VAE).

The quantizer maps each encoder vector z_e to its nearest codebook entry e_k and passes
gradients to the encoder with the straight-through estimator.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def codebook_stats(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """Perplexity and usage of the codes in ``indices``.

    Args:
      indices: int32[...] code indices in [0, n_embed).
      n_embed: codebook size.

    Returns:
      ``(perplexity, usage)``, float32 scalars: exp of the entropy (nats) of the empirical code
      distribution, in [1, n_embed]; and the fraction of the n_embed codes used at least once,
      in (0, 1].
    """
    counts = jnp.zeros((n_embed,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10))))
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    return perplexity, usage


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with the straight-through estimator.

    Implements van den Oord et al. 2017, eq. 3 (as used by Esser et al. 2021, eq. 4)::

        L_VQ = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2

    The first (codebook) term moves the codebook toward the encoder outputs, the second
    (commitment) term, weighted by ``beta``, moves the encoder toward its codes. Both are
    means over all elements. (taming-transformers' legacy ``VectorQuantizer2`` puts beta on the
    codebook term instead; we follow the paper.)

    Attributes:
      n_embed: codebook size K (>= 2).
      embed_dim: code dimension D.
      beta: commitment weight (0.25 in the papers).
      l2_normalize: if True, both z_e and the codebook are l2-normalized before the lookup
        (Yu et al. 2021, sec. 3.2); this keeps low-dimensional codebooks alive.
      dtype: dtype of the returned z_q. Distances are always computed in float32.
    """
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    l2_normalize: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        # taming: nn.Embedding initialised U(-1/K, 1/K).
        limit = 1.0 / self.n_embed
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit)
        self.codebook = self.param(
            "codebook", nn.with_logical_partitioning(init, ("codebook_n", "codebook_d")),
            (self.n_embed, self.embed_dim), jnp.float32)

    def embeddings(self) -> jax.Array:
        """The codebook as used for lookup: float32[n_embed, embed_dim]."""
        codebook = jnp.asarray(self.codebook, jnp.float32)
        return _l2_normalize(codebook) if self.l2_normalize else codebook

    def __call__(self, z_e: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantize.

        Args:
          z_e: float[..., embed_dim], e.g. [B, h, w, D], the encoder output after quant_conv.

        Returns:
          ``(z_q, aux)``: z_q has z_e's shape and ``self.dtype``, equal in value to the chosen
          codes and in gradient to z_e (straight-through). aux holds ``indices``
          (int32[...]), ``codebook_loss`` and ``commitment_loss`` (float32 scalars, the
          second already multiplied by beta), ``vq_loss`` (their sum), ``perplexity`` and
          ``codebook_usage`` over the batch (see :func:`codebook_stats`).

        Raises:
          ValueError: if z_e's last dimension is not embed_dim.
        """
        if z_e.shape[-1] != self.embed_dim:
            raise ValueError(f"z_e has {z_e.shape[-1]} channels; the quantizer expects "
                             f"embed_dim={self.embed_dim}.")
        z = z_e.astype(jnp.float32)
        if self.l2_normalize:
            z = _l2_normalize(z)
        codebook = self.embeddings()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, in float32 at full matmul precision.
        dots = jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
        distances = (jnp.sum(z * z, axis=-1, keepdims=True) - 2.0 * dots
                     + jnp.sum(codebook * codebook, axis=-1))
        indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
        e = jnp.take(codebook, indices, axis=0)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - e) ** 2)
        commitment_loss = self.beta * jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
        z_q = z + jax.lax.stop_gradient(e - z)
        perplexity, usage = codebook_stats(indices, self.n_embed)
        aux = dict(indices=indices, codebook_loss=codebook_loss,
                   commitment_loss=commitment_loss, vq_loss=codebook_loss + commitment_loss,
                   perplexity=perplexity, codebook_usage=usage)
        return z_q.astype(self.dtype), aux

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for ``indices``: int[...] in [0, n_embed) -> self.dtype[..., embed_dim]."""
        return jnp.take(self.embeddings(), indices, axis=0).astype(self.dtype)
