"""A VQGAN small enough to train on 2 CPU cores in minutes, on eight photos that ship inside
scikit-image and scikit-learn (chelsea and coffee held out). `make demo` runs it into runs/demo.

f4 (64x64 crops -> 16x16 codes), 32 base channels, 1024 l2-normalized 8-dimensional codes
(Yu et al. 2021, sec. 3.2: low-dimensional normalized codes keep a small codebook in use),
trained with L1 + LPIPS (VGG16) + the VQ loss; the PatchGAN stays off (below).
"""

from vqgan_jax.config_base import tokenizer_config


def get_config():
    c = tokenizer_config()
    c.dataset = "demo"
    c.image_size = 64
    # 64x64 windows at the photos' own scale: the held-out photos are scored whole, at full
    # size (+0.8 dB over crops of 25-100% of the short side resized to 64; BENCHMARKS.md).
    c.crop_mode = "random"
    # Batch 4, 600 steps: with LPIPS a step costs 560-880 ms on the project's 2-core machines
    # (BENCHMARKS.md), so `make demo` fits 15 minutes on the slower ones. 1000 steps reach
    # 24.96 dB and LPIPS 0.361, but take stage 1 alone to ~15 minutes there.
    c.batch_size = 4
    c.num_train_steps = 600
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                   z_channels=32, embed_dim=8, n_embed=1024, l2_normalize_codes=True,
                   norm_groups=8)  # 4 channels a group, as taming's 128 / 32; one a group: -1.2 dB
    c.disc.ndf = 32
    # The PatchGAN stays off: within the demo's steps it never helped held-out LPIPS. With
    # taming's adaptive weight (disc_weight 0.8) switched on at step 200-250 it wrecks the
    # model (16 dB, LPIPS 0.66); at 0.05-0.1 from step 300 (with LeCAM or not) the
    # discriminator wins at once, the adaptive weight falls to ~0.004 and nothing changes
    # (BENCHMARKS.md). taming switches it on after 250k ImageNet steps.
    c.loss.disc_start = 100_000
    # LPIPS (VGG16) in the loss at weight 1 (as taming): held-out LPIPS 0.40 after 500-600
    # steps against 0.445 after 800 steps of L1 alone; weights 0.5, 2 and 3 were worse.
    c.loss.perceptual_weight = 1.0
    # lr 5e-4 at batch 4 (1e-3 at batch 8), warmed up over 50 steps, then a half cosine to 0
    # at the last step.
    c.optimizer.update(base_learning_rate=1e-3 / 8, b1=0.9, b2=0.99, lr_schedule="cosine",
                       warmup_steps=50)
    # EMA codebook (van den Oord et al. 2017, app. A.1) with dead codes re-seeded from the batch
    # after 50 unused steps: 85-87% of the held-out photos' codes in use at the end (64-70%
    # with L1 alone) instead of 20%.
    c.quantizer.update(kind="ema_vq", restart_unused_steps=50)
    c.log_every_steps = 25
    c.eval_every_steps = 10_000   # evaluate once, at the end
    c.num_eval_images = 2
    c.checkpoint_every_steps = 200
    return c
