"""VQGAN f16, 1024 codes, ImageNet 256x256: taming-transformers' imagenet_vqgan recipe.

72,141,699 tokenizer parameters. Run:
  python -m vqgan_jax.main --config=configs/imagenet_f16.py --workdir=DIR
"""

from vqgan_jax.config_base import tokenizer_config


def get_config():
    return tokenizer_config()
