"""vqgan_jax: VQGAN image tokenizers (Esser et al. 2021) in JAX/Flax.

The public API (:mod:`vqgan_jax.api`): ``load_tokenizer``, ``load_generator``, and the
``Tokenizer`` and ``Generator`` they return. They are imported on first use, so that
``import vqgan_jax`` stays cheap.
"""

from vqgan_jax import xla_cpu as _xla_cpu

# Before any backend starts: XLA:CPU's convolutions on its Eigen kernels (see xla_cpu.py).
_xla_cpu.apply_defaults()

__all__ = ["Generator", "Tokenizer", "load_generator", "load_tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        from vqgan_jax import api
        return getattr(api, name)
    raise AttributeError(f"module 'vqgan_jax' has no attribute {name!r}")
