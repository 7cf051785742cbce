"""vqgan_jax: VQGAN image tokenizers (Esser et al. 2021) in JAX/Flax."""

from vqgan_jax import xla_cpu as _xla_cpu

# Before any backend starts: XLA:CPU's convolutions on its Eigen kernels (see xla_cpu.py).
_xla_cpu.apply_defaults()
