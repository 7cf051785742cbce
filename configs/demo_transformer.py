"""A class-conditional GPT small enough to train on 2 CPU cores in minutes, over the codes of
the demo tokenizer (configs/demo.py -> runs/demo). `make demo` runs it second, into
runs/demo/transformer.

The class is which of the eight training photos a crop came from. 64x64 crops -> 16x16 codes of
the f4 tokenizer; 1 class token + 256 codes; 4 layers of width 128 (1.1M parameters).
"""

from vqgan_jax.config_base import transformer_config


def get_config():
    c = transformer_config()
    c.tokenizer_workdir = "runs/demo"
    c.dataset = "demo"
    c.image_size = 64
    c.min_crop_scale = 0.25
    c.batch_size = 8
    # 200 steps: 6.64 bits per code over the batch-4 demo tokenizer (300 steps over the batch-8
    # one: 6.83); 100 steps more cost ~70 s on the slower 2-core machines, where `make demo`
    # would not fit 15 minutes (BENCHMARKS.md).
    c.num_train_steps = 200
    c.conditioning = "class"
    c.num_classes = 8                   # the demo's eight training photos
    c.class_drop_prob = 0.1
    c.model.update(block_size=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    c.optimizer.base_learning_rate = 1e-3 / 8   # lr 1e-3 at batch 8
    c.sample.update(num_per_row=8, max_rows=8, top_k=100, top_p=0.95)
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    return c
