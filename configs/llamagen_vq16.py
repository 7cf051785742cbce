"""LlamaGen's VQ-16 tokenizer, ImageNet 256x256 (Sun et al. 2024; their ``vq_ds16_c2i.pt``).

71,883,403 tokenizer parameters (their VQ_16's ``parameters()``; tests/test_llamagen.py counts
both). Load their released weights:
  python -m vqgan_jax.convert --from_llamagen=vq_ds16_c2i.pt --out=runs/llamagen_vq16
Train one from scratch:
  python -m vqgan_jax.main --config=configs/llamagen_vq16.py --workdir=DIR
"""

from vqgan_jax.config_base import llamagen_vq16_config


def get_config():
    return llamagen_vq16_config()
