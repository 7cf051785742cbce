"""A VQGAN small enough to train on 2 CPU cores in minutes, on the photos bundled with
scikit-image (chelsea and coffee held out). `make demo` runs it into runs/demo.

f4 (64x64 crops -> 16x16 codes), 32 base channels, 1024 l2-normalized 8-dimensional codes
(Yu et al. 2021, sec. 3.2: low-dimensional normalized codes keep a small codebook in use).
"""

from vqgan_jax.config_base import tokenizer_config


def get_config():
    c = tokenizer_config()
    c.dataset = "demo"
    c.image_size = 64
    c.min_crop_scale = 0.25
    # Batch 4, 800 steps: a step costs 494 ms at batch 4 and 886 ms at batch 8 on the slower
    # 2-core machines of the project (BENCHMARKS.md), so `make demo` fits 15 minutes there.
    # Held-out PSNR 23.17 dB, 66% of the codes in use (batch 8: 23.96 dB, 67%, but 14 minutes
    # for stage 1 alone on those machines; batch 4 at lr 1e-3 instead of 5e-4: 22.82 dB).
    c.batch_size = 4
    c.num_train_steps = 800
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                   z_channels=32, embed_dim=8, n_embed=1024, l2_normalize_codes=True,
                   norm_groups=8)  # 4 channels a group, as taming's 128 / 32; one a group: -1.2 dB
    c.disc.ndf = 32
    # taming switches the discriminator on after 250k ImageNet steps, once reconstructions are
    # good; a 10-minute run never gets there (switched on at step 500 it cost up to 1.7 dB).
    c.loss.disc_start = 100_000
    # LPIPS's VGG16 triples the step time on 2 CPU cores (1.9 s vs 0.63 s) and buys nothing
    # measurable in a few hundred steps; metrics.json still reports held-out LPIPS.
    c.loss.perceptual_weight = 0.0
    # lr 5e-4 at batch 4 (1e-3 at batch 8), warmed up over 50 steps, then a half cosine to 0
    # at the last step.
    c.optimizer.update(base_learning_rate=1e-3 / 8, b1=0.9, b2=0.99, lr_schedule="cosine",
                       warmup_steps=50)
    # EMA codebook (van den Oord et al. 2017, app. A.1) with dead codes re-seeded from the batch
    # after 50 unused steps: 64-70% of the codes in use at the end instead of 20%.
    c.quantizer.update(kind="ema_vq", restart_unused_steps=50)
    c.log_every_steps = 25
    c.eval_every_steps = 10_000   # evaluate once, at the end
    c.num_eval_images = 2
    c.checkpoint_every_steps = 200
    return c
