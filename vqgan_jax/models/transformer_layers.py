"""The transformer layers the ViT-VQGAN (:mod:`vqgan_jax.models.vit_vqgan`) and the stage-2 GPT
(:mod:`vqgan_jax.models.gpt`) share: Dense and LayerNorm, multi-head self-attention
(bidirectional, or causal with a fixed-size KV cache) and the pre-LayerNorm block.

Parameters are float32 whatever the compute ``dtype`` and carry logical axis names (``embed``,
``heads``, ``mlp``; :mod:`vqgan_jax.parallel`). Each model keeps its own parameter names,
initializers and LayerNorm epsilon (its checkpoints and the taming GPT key mapping hold).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Init = Callable[..., jax.Array]
XAVIER = nn.initializers.xavier_uniform()  # vit_jax's Dense init


def dense(features: int, axes: tuple, dtype: Dtype, name: str, init: Init = XAVIER) -> nn.Dense:
    """Dense to ``features`` with kernel axes ``axes`` (in, out), a zero bias on ``axes[1]``."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(dtype: Dtype, name: str, epsilon: float) -> nn.LayerNorm:
    """LayerNorm over the last (``embed``) axis, float32 scale and bias."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class SelfAttention(nn.Module):
    """Multi-head self-attention ``x: [B, T, width] -> [B, T, width]``; softmax in float32.

    Bidirectional when ``block_size`` is None. Causal otherwise: with ``cache`` (``k, v:
    [B, heads, block_size, head_dim]``) the tokens sit at positions ``pos .. pos+T-1`` and the
    updated cache is returned, else at ``0 .. T-1`` and ``None`` is returned.

    Attributes:
      num_heads: heads (``width % num_heads == 0``).
      block_size: KV cache length of the causal form; None for bidirectional attention.
      dropout: dropout on the attention weights (training only).
      float32_logits: accumulate ``q.k`` in float32 (ViT); else in ``dtype`` (GPT, as minGPT).
      names: of the fused ``[width, 3 * width]`` q/k/v projection and the output projection.
      kernel_init, dtype: both kernels' initializer; the compute dtype.
    """
    num_heads: int
    block_size: int | None = None
    dropout: float = 0.0
    float32_logits: bool = True
    names: tuple[str, str] = ("qkv", "proj")
    kernel_init: Init = XAVIER
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: tuple[jax.Array, jax.Array] | None = None,
                 pos: jax.Array | int = 0, train: bool = False):
        b, t, c = x.shape
        hd = c // self.num_heads
        qkv = dense(3 * c, ("embed", "heads"), self.dtype, self.names[0], self.kernel_init)(x)
        q, k, v = qkv.reshape(b, t, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)  # (B, H, T, hd)
        new_cache = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, 0, pos, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, 0, pos, 0))
            new_cache = (k, v)
        att = jnp.einsum("bhqd,bhkd->bhqk", q, k.astype(q.dtype),
                         preferred_element_type=jnp.float32 if self.float32_logits else None)
        att = att.astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
        if self.block_size is not None:  # causal (and, with a cache, not yet written)
            k_pos = jnp.arange(t if cache is None else self.block_size)
            att = jnp.where(k_pos[None, :] <= (pos + jnp.arange(t))[:, None], att, -jnp.inf)
        att = jax.nn.softmax(att, axis=-1)
        att = nn.Dropout(self.dropout)(att, deterministic=not train).astype(self.dtype)
        y = jnp.einsum("bhqk,bhkd->bhqd", att, v.astype(self.dtype))
        y = y.transpose(0, 2, 1, 3).reshape(b, t, c)
        y = dense(c, ("heads", "embed"), self.dtype, self.names[1], self.kernel_init)(y)
        return y, new_cache


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + drop(attn(ln_1(x)))``, then ``x + drop(mlp(ln_2(x)))`` with
    a GELU MLP of width ``mlp_dim``; ``(x: [B, T, width], cache, pos, train) -> (x, cache)`` as
    :class:`SelfAttention`, whose fields it passes on (``attn_dropout`` its ``dropout``).
    ``dropout`` acts on both residual branches, ``epsilon`` in both LayerNorms; ``names``: the
    attention's two projections and the MLP's first layer (the second is ``mlp_proj``).
    """
    num_heads: int
    mlp_dim: int
    block_size: int | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    float32_logits: bool = True
    epsilon: float = 1e-6
    names: tuple[str, str, str] = ("qkv", "proj", "fc")
    kernel_init: Init = XAVIER
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: tuple[jax.Array, jax.Array] | None = None,
                 pos: jax.Array | int = 0, train: bool = False):
        c = x.shape[-1]
        drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
        y, new_cache = SelfAttention(self.num_heads, self.block_size, self.attn_dropout,
                                     self.float32_logits, self.names[:2], self.kernel_init,
                                     self.dtype, name="attn")(
            layer_norm(self.dtype, "ln_1", self.epsilon)(x), cache, pos, train)
        x = x + drop(y)
        h = layer_norm(self.dtype, "ln_2", self.epsilon)(x)
        h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.names[2], self.kernel_init)(h)
        h = dense(c, ("mlp", "embed"), self.dtype, "mlp_proj", self.kernel_init)(
            nn.gelu(h, approximate=False))
        return x + drop(h), new_cache
