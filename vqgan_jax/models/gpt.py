"""The stage-2 transformer over code indices (Esser et al. 2021, sec. 3.2; minGPT).

A decoder-only GPT: token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks of
causal multi-head self-attention and a 4x GELU MLP, a final LayerNorm and a linear head over
the ``vocab_size`` codes. The input vocabulary is the codes followed by ``n_cond_tokens``
conditioning tokens (start token, class ids, the null class, condition codes: see
``trainers/transformer.py``); the head predicts codes only.

Decoding uses a KV cache of fixed shape ``[B, n_head, block_size, head_dim]`` per layer: a call
with ``cache`` writes the keys and values of its ``T`` tokens at positions
``pos .. pos+T-1`` and attends to every cached position ``<=`` each query's own, so a prefix
can be written in one call and then one token a call (see :mod:`vqgan_jax.samplers.autoregressive`).

Every parameter carries logical axis names (``embed``, ``heads``, ``mlp``, ``vocab``; position
tables have ``None`` on their position axis) through ``nn.with_logical_partitioning``. The
residual stream ``[B, T, n_embd]`` is constrained to ``("activation_batch", "activation_length",
"activation_embed")`` after the embeddings and every block (a no-op unless a step is traced under
logical-axis rules and a mesh, see :mod:`vqgan_jax.parallel`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.transformer_layers import Block, layer_norm

Dtype = Any
Cache = list[tuple[jax.Array, jax.Array]]  # per layer (k, v): [B, n_head, block_size, head_dim]

_INIT = nn.initializers.normal(stddev=0.02)  # minGPT's init for linear and embedding weights
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class GPT(nn.Module):
    """minGPT over code indices (Esser et al. 2021, sec. 3.2; taming's ``GPT``).

    Attributes:
      vocab_size: number of codes: the head's outputs, and input tokens ``[0, vocab_size)``.
      n_cond_tokens: extra input-only tokens ``[vocab_size, vocab_size + n_cond_tokens)``
        (start token, class ids, null class, condition codes); never predicted.
      block_size: most tokens one sequence can hold (position embeddings, KV cache length).
      n_layer, n_head, n_embd: depth, attention heads, width (``n_embd % n_head == 0``).
      dropout: dropout on embeddings, attention weights and residual branches (training only).
      remat: rematerialize each block in the backward pass (same parameters and results; less
        activation memory for about one more forward pass).
      dtype: compute dtype (bfloat16 on accelerators); parameters are float32.
    """
    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    n_cond_tokens: int = 0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        self.wte = nn.Embed(self.vocab_size + self.n_cond_tokens, self.n_embd, dtype=self.dtype,
                            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")))
        self.wpe = self.param("wpe", nn.with_logical_partitioning(_INIT, (None, "embed")),
                              (self.block_size, self.n_embd))
        self.drop = nn.Dropout(self.dropout)
        # train (4th call argument after self) stays static under remat.
        block = nn.remat(Block, static_argnums=(4,)) if self.remat else Block
        # minGPT's names, init and LayerNorm epsilon; q.k in the compute dtype.
        self.blocks = [block(self.n_head, 4 * self.n_embd, self.block_size, self.dropout,
                             self.dropout, float32_logits=False, epsilon=1e-5,
                             names=("c_attn", "c_proj", "c_fc"), kernel_init=_INIT,
                             dtype=self.dtype, name=f"h_{i}") for i in range(self.n_layer)]
        self.ln_f = layer_norm(self.dtype, "ln_f", 1e-5)
        self.head = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "vocab")))

    def __call__(self, tokens: jax.Array, cache: Cache | None = None, pos: jax.Array | int = 0,
                 train: bool = False) -> tuple[jax.Array, Cache | None]:
        """Next-code logits for every position.

        Args:
          tokens: int32[B, T] in ``[0, vocab_size + n_cond_tokens)``, ``pos + T <= block_size``.
          cache: from :meth:`init_cache` (or a previous call), or None for no cache.
          pos: position of ``tokens[:, 0]`` (int or int32 scalar, traced is fine); must be 0
            without a cache.
          train: enables dropout (needs a ``dropout`` rng).

        Returns:
          ``(logits, cache)``: float32[B, T, vocab_size], logits[:, i] predicting the code that
          follows ``tokens[:, i]``; and the updated cache (None without one).
        """
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"{t} tokens exceed block_size={self.block_size}.")
        wpe = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.wpe), pos, t, axis=0)
        x = self.wte(tokens) + wpe.astype(self.dtype)[None]
        x = nn.with_logical_constraint(self.drop(x, deterministic=not train), RESIDUAL_AXES)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, None if cache is None else cache[i], pos, train)
            x = nn.with_logical_constraint(x, RESIDUAL_AXES)
            new_cache.append(layer_cache)
        logits = self.head(self.ln_f(x)).astype(jnp.float32)
        return logits, (None if cache is None else new_cache)

    def init_cache(self, batch_size: int) -> Cache:
        """Zeroed KV cache: ``n_layer`` pairs of ``dtype[batch_size, n_head, block_size, head_dim]``.

        Needs no parameters: call as ``gpt.init_cache(B)`` on the unbound module.
        """
        shape = (batch_size, self.n_head, self.block_size, self.n_embd // self.n_head)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                for _ in range(self.n_layer)]
