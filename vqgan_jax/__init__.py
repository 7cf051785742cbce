"""vqgan_jax: VQGAN image tokenizers (Esser et al. 2021) in JAX/Flax."""
