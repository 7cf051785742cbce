"""A ViT-VQGAN (Yu et al. 2021) small enough to train on 2 CPU cores in minutes, on the demo
photos (`config.dataset = "demo"`, as configs/demo.py; its own crops, batch 8, 650 steps and
lr 5e-4), to compare with the conv tokenizer there.

    python -m vqgan_jax.main --config=configs/vitvqgan_demo.py --workdir=runs/vitvqgan_demo

Patch 4, not the paper's 8: a 64x64 crop then gives the same 16x16 code grid (f4) as
configs/demo.py, so the two tokenizers compress alike and configs/demo_transformer.py runs on
either (with 8x8 patches a 64x64 crop is an 8x8 grid, f8). Encoder and decoder: 2 pre-LN
blocks of width 128 (4 heads, MLP 256) each; 1024 l2-normalized 8-dimensional codes as in
configs/demo.py (the paper: 8192 of 32).

Loss: the paper's reconstruction terms (1.0 L2 + 0.1 logit-Laplace) + L_VQ; LPIPS (0.1 in
the paper) and the adversarial term are left out of a few-minute run for step time; the
StyleGAN2 discriminator is configured (small) and switches on with
--config.loss.disc_start=N, LPIPS with --config.loss.perceptual_weight=0.1.
"""

from vqgan_jax.config_base import tokenizer_config


def get_config():
    c = tokenizer_config()
    c.arch = "vit_vqgan"
    c.model = vit_demo_model()
    c.dataset = "demo"
    c.image_size = 64
    c.min_crop_scale = 0.25
    c.batch_size = 8
    c.num_train_steps = 650
    c.disc.update(kind="stylegan", channel_base=2048, channel_max=128)
    c.loss.update(
        disc_start=100_000,             # off within the demo's steps
        disc_weight=0.1, adaptive_disc_weight=False,
        disc_loss="non_saturating", gen_loss="non_saturating",
        l1_weight=0.0, l2_weight=1.0, logit_laplace_weight=0.1, perceptual_weight=0.0)
    c.optimizer.base_learning_rate = 5e-4 / 8    # lr 5e-4 at batch 8
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.log_every_steps = 25
    c.eval_every_steps = 10_000   # evaluate once, at the end
    c.num_eval_images = 2
    c.checkpoint_every_steps = 200
    return c


def vit_demo_model():
    from vqgan_jax.config_base import vit_vqgan_model
    m = vit_vqgan_model(patch_size=4, embed_dim=8, n_embed=1024)
    m.update(enc_layers=2, enc_width=128, enc_heads=4, enc_mlp_dim=256,
             dec_layers=2, dec_width=128, dec_heads=4, dec_mlp_dim=256)
    return m
