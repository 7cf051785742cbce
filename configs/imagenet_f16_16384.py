"""VQGAN f16 with 16384 codes on ImageNet 256x256 (taming's second published tokenizer).

76,073,859 tokenizer parameters.
"""

from vqgan_jax.config_base import tokenizer_config


def get_config():
    c = tokenizer_config()
    c.model.n_embed = 16384
    return c
