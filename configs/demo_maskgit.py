"""A class-conditional MaskGIT small enough to train on 2 CPU cores in minutes, over the codes
of the demo tokenizer (configs/demo.py -> runs/demo): the masked-token counterpart of
configs/demo_transformer.py, at the same size and batch (300 steps; the GPT now trains 200
to keep `make demo` within 15 minutes).

The class is which of the eight training photos a crop came from. 64x64 crops -> 16x16 codes of
the f4 tokenizer; 1 class token + 256 codes; 4 layers of width 128 (1,090,688 parameters).
"""

from vqgan_jax.config_base import maskgit_config


def get_config():
    c = maskgit_config()
    c.tokenizer_workdir = "runs/demo"
    c.dataset = "demo"
    c.image_size = 64
    c.min_crop_scale = 0.25
    c.batch_size = 8
    c.num_train_steps = 300
    c.conditioning = "class"
    c.num_classes = 8                   # the demo's eight training photos
    c.class_drop_prob = 0.1
    c.label_smoothing = 0.1             # as MaskGIT
    c.model.update(n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    c.optimizer.update(base_learning_rate=1e-3 / 8, weight_decay=0.045)  # lr 1e-3 at batch 8
    c.sample.update(num_per_row=8, max_rows=8, num_steps=8, top_k=0, temperature=1.0,
                    choice_temperature=4.5)
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    return c
