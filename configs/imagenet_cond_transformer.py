"""Class-conditional ImageNet GPT in the class of taming-transformers' 1.4B model (Esser et al.
2021, sec. 4.3 and table 7: 48 layers, width 1536, 24 heads, 16384 codes on a 16x16 grid,
1000 classes).

Needs a stage-1 workdir trained with configs/imagenet_f16_16384.py (set
``--config.tokenizer_workdir``). Parameters and Adam states are sharded over all devices
(``mesh.fsdp=-1``); compute in bfloat16.
"""

from vqgan_jax.config_base import transformer_config


def get_config():
    c = transformer_config()
    c.tokenizer_workdir = "runs/imagenet_f16_16384"   # a workdir of configs/imagenet_f16_16384.py
    c.dataset = "imagenet2012"
    c.image_size = 256                  # 16x16 codes with the f16 tokenizer
    c.batch_size = 256
    c.num_train_steps = 500_000
    c.conditioning = "class"
    c.num_classes = 1000
    c.class_drop_prob = 0.1             # enables classifier-free guidance (taming has none)
    c.model.update(block_size=256, n_layer=48, n_head=24, n_embd=1536, dropout=0.0)
    c.dtype = "bfloat16"
    c.mesh.update(data=1, fsdp=-1)
    c.sample.update(top_k=600, top_p=0.92, temperature=1.0)
    return c
