"""ViT-VQGAN on ImageNet 256x256 (Yu et al. 2021, "Vector-quantized Image Modeling with Improved
VQGAN"): 8x8 patches -> 32x32 codes, 8192 l2-normalized 32-dimensional codes.

    python -m vqgan_jax.main --config=configs/vitvqgan_imagenet.py:SB --workdir=DIR

The argument picks the encoder/decoder pair of the paper's table 1: SS (Small + Small),
SB (Small encoder + Base decoder, the default) or LL (Large + Large); Small is 8 layers of
width 512 (8 heads, MLP 2048), Base 12 / 768 / 12 / 3072, Large 32 / 1280 / 16 / 5120.

Loss (sec. 3.3): L_VQ + 0.1 L_adv + 0.1 LPIPS + 0.1 logit-Laplace + 1.0 L2, with a StyleGAN2
discriminator and a fixed (not adaptive) adversarial weight. The paper trains with Adam
(b1 0.9, b2 0.99) at lr 1e-4, batch 256; its warm-up and cosine decay are not implemented
here (constant lr). R1, LeCAM and the generator EMA are left off (the paper does not list
them); switch them on with --config.loss.r1_weight etc.
"""

from vqgan_jax.config_base import tokenizer_config, vit_vqgan_model

PAIRS = {"SS": ("small", "small"), "SB": ("small", "base"), "LL": ("large", "large")}


def get_config(pair: str = "SB"):
    if pair not in PAIRS:
        raise ValueError(f"configs/vitvqgan_imagenet.py:{pair}; use one of {sorted(PAIRS)}.")
    c = tokenizer_config()
    c.arch = "vit_vqgan"
    c.model = vit_vqgan_model(*PAIRS[pair], patch_size=8, embed_dim=32, n_embed=8192)
    c.image_size = 256
    c.batch_size = 256
    c.num_train_steps = 500_000
    c.disc.kind = "stylegan"
    c.loss.update(
        disc_start=0,                   # the paper gives no adversarial warm-up
        disc_weight=0.1, adaptive_disc_weight=False, disc_factor=1.0,
        disc_loss="non_saturating", gen_loss="non_saturating",   # StyleGAN2's logistic loss
        codebook_weight=1.0, l1_weight=0.0, l2_weight=1.0, logit_laplace_weight=0.1,
        perceptual_weight=0.1)
    c.optimizer.update(base_learning_rate=1e-4 / 256, b1=0.9, b2=0.99)
    if pair == "LL":  # ~1.3B generator parameters: shard them, compute in bfloat16.
        c.dtype = "bfloat16"
        c.mesh.update(data=1, fsdp=-1)
    return c
