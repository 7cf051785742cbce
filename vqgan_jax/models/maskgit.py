"""The bidirectional transformer of masked-token generation (Chang et al. 2022, "MaskGIT", sec. 3).

It reads a code grid in which some codes are replaced by the ``[MASK]`` token and predicts, at
every position, a distribution over the ``vocab_size`` codes; training scores the masked
positions only (:mod:`vqgan_jax.trainers.maskgit`), sampling fills the grid in a few parallel
steps (:mod:`vqgan_jax.samplers.maskgit`).

Token layout (``V = vocab_size``, ``C = num_classes``):

* ``[0, V)``: image codes;
* ``V``: ``[MASK]`` (:attr:`MaskGIT.mask_token`);
* ``V + 1 + c`` for ``c`` in ``[0, C)``: the class tokens;
* ``V + 1 + C``: the null class (:attr:`MaskGIT.null_token`), the prefix of an unconditional
  model (``C = 0``) and the dropped label of classifier-free guidance (Ho & Salimans 2021).

The sequence is ``[class token] + N codes``, learned positions over all ``N + 1`` tokens,
``n_layer`` pre-LayerNorm blocks of bidirectional attention and a 4x GELU MLP
(:class:`vqgan_jax.models.transformer_layers.Block`), a final LayerNorm and a linear head over
the V codes at the N code positions. Parameters carry the GPT's logical axis names (``vocab``,
``embed``, ``heads``, ``mlp``), so ``config_base.TRANSFORMER_RULES`` shard both alike.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.gpt import RESIDUAL_AXES
from vqgan_jax.models.transformer_layers import Block, layer_norm

Dtype = Any
_INIT = nn.initializers.normal(stddev=0.02)  # BERT's (and MaskGIT's) truncated-normal scale


class MaskGIT(nn.Module):
    """Bidirectional transformer over a partly masked code grid (Chang et al. 2022, sec. 3.1).

    Attributes:
      vocab_size: V, the tokenizer's number of codes (the head's outputs).
      seq_len: N, codes per image (h * w of the code grid).
      num_classes: C class tokens; 0 for an unconditional model (every prefix is the null token).
      n_layer, n_head, n_embd: depth, attention heads, width (``n_embd % n_head == 0``).
      dropout: on embeddings, attention weights and residual branches (training only).
      remat: rematerialize each block in the backward pass (same results, less memory).
      dtype: compute dtype; parameters are float32.
    """
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 768
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    @property
    def mask_token(self) -> int:
        """The ``[MASK]`` token id, ``vocab_size``."""
        return self.vocab_size

    @property
    def null_token(self) -> int:
        """The null-class token id, ``vocab_size + 1 + num_classes``."""
        return self.vocab_size + 1 + self.num_classes

    def class_tokens(self, class_ids: jax.Array) -> jax.Array:
        """int[B] class ids in ``[0, num_classes)`` -> int32[B] class tokens."""
        return self.vocab_size + 1 + jnp.asarray(class_ids, jnp.int32)

    @nn.compact
    def __call__(self, codes: jax.Array, cond_tokens: jax.Array, train: bool = False
                 ) -> jax.Array:
        """Logits over the codes at every grid position.

        Args:
          codes: int32[B, N], codes in ``[0, V)`` or :attr:`mask_token`.
          cond_tokens: int32[B], a class token (:meth:`class_tokens`) or :attr:`null_token`.
          train: enables dropout (needs a ``dropout`` rng).

        Returns:
          float32[B, N, V]: logits of the code at each position (all positions, masked or not).

        Raises:
          ValueError: if ``codes`` does not have ``seq_len`` positions.
        """
        if codes.shape[1] != self.seq_len:
            raise ValueError(f"codes has {codes.shape[1]} positions; the model reads "
                             f"seq_len={self.seq_len}.")
        tokens = jnp.concatenate([cond_tokens[:, None].astype(jnp.int32),
                                  codes.astype(jnp.int32)], axis=1)
        wte = nn.Embed(self.vocab_size + 2 + self.num_classes, self.n_embd, dtype=self.dtype,
                       embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
                       name="wte")
        wpe = self.param("wpe", nn.with_logical_partitioning(_INIT, (None, "embed")),
                         (self.seq_len + 1, self.n_embd))
        x = wte(tokens) + jnp.asarray(wpe).astype(self.dtype)[None]
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        # train (4th call argument after self) stays static under remat.
        block = nn.remat(Block, static_argnums=(4,)) if self.remat else Block
        for i in range(self.n_layer):
            x, _ = block(self.n_head, 4 * self.n_embd, None, self.dropout, self.dropout,
                         float32_logits=True, epsilon=1e-5, kernel_init=_INIT, dtype=self.dtype,
                         name=f"h_{i}")(x, None, 0, train)
            x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        x = layer_norm(self.dtype, "ln_f", 1e-5)(x[:, 1:])
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="head",
                          kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "vocab")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ("vocab",)))(x)
        return logits.astype(jnp.float32)


def num_params(vocab_size: int, seq_len: int, num_classes: int, n_layer: int, n_embd: int
               ) -> int:
    """The exact parameter count of a :class:`MaskGIT` (embeddings, blocks, final LN, head)."""
    d = n_embd
    embeddings = (vocab_size + 2 + num_classes) * d + (seq_len + 1) * d
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return embeddings + n_layer * block + 2 * d + d * vocab_size + vocab_size
