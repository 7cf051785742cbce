"""MaskGIT on ImageNet 256x256 (Chang et al. 2022, sec. 4.1 and appendix A): a bidirectional
transformer of 24 layers, width 768, 16 heads (MLP 3072), dropout 0.1, over the 16x16 codes of
an f16 tokenizer with 1024 codes; 1000 classes. AdamW (b1 0.9, b2 0.96, weight decay 0.045),
lr 1e-4 at batch 256, label smoothing 0.1; 172,651,264 parameters. Sampling: 8 steps, cosine
schedule, choice temperature 4.5.

Not reproduced: their learning-rate warmup (5000 steps) and cosine decay (this lr is constant)
and the 300 epochs' exact step count.
"""

from vqgan_jax.config_base import maskgit_config


def get_config():
    c = maskgit_config()
    # A stage-1 workdir of an f16 tokenizer with 1024 codes at 256x256 (e.g. a run of
    # configs/imagenet_f16.py); placeholder: set it with --config.tokenizer_workdir=DIR.
    c.tokenizer_workdir = "runs/imagenet_f16"
    c.dataset = "imagenet2012"
    c.image_size = 256                  # 16x16 codes at f16
    c.min_crop_scale = 0.5
    c.batch_size = 256
    c.num_train_steps = 1_500_000       # ~300 epochs of ImageNet's 1.28M images at batch 256
    c.conditioning = "class"
    c.num_classes = 1000
    c.class_drop_prob = 0.1             # null class for classifier-free guidance
    c.label_smoothing = 0.1
    c.model.update(n_layer=24, n_head=16, n_embd=768, dropout=0.1)
    c.dtype = "bfloat16"                # compute dtype on accelerators; parameters stay float32
    c.optimizer.update(base_learning_rate=1e-4 / 256, b1=0.9, b2=0.96, weight_decay=0.045)
    c.sample.update(num_per_row=8, max_rows=8, num_steps=8, top_k=0, temperature=1.0,
                    choice_temperature=4.5, guidance_scale=1.0, guidance_schedule="constant")
    return c
