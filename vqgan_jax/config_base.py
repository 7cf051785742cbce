"""Default config fields for every recipe in configs/ (stage 1: tokenizer_config, stage 2:
transformer_config); recipes override what differs.

Every field is read by some code; comments give units and meaning.
"""

import ml_collections

# Logical-axis rules, (logical name, mesh axis | mesh axes | None), first free match wins
# (flax.linen.logical_to_mesh_axes). Parameter names come from vqgan_jax/models.
_CONV_RULES = (
    ("conv_out", "fsdp"),               # conv kernels [kh, kw, in, out] and biases: out channels
    ("codebook_n", "fsdp"),             # the codebook [n_embed, embed_dim]: its rows
)
TOKENIZER_RULES = (
    ("activation_batch", ("data", "fsdp")),  # activations' batch axis
    *_CONV_RULES,
)
TRANSFORMER_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("embed", "fsdp"),                  # model width of every GPT matrix
    ("heads", "tensor"),                # attention q/k/v outputs and c_proj inputs
    ("mlp", "tensor"),                  # the 4x MLP hidden units
    ("vocab", "tensor"),                # token embedding rows and head outputs
    *_CONV_RULES,                       # the frozen tokenizer(s)
)


def tokenizer_config() -> ml_collections.ConfigDict:
    """The conv VQGAN recipe of Esser et al. 2021 (taming-transformers' imagenet_vqgan.yaml)."""
    c = ml_collections.ConfigDict()
    c.stage = "tokenizer"               # which trainer main runs
    c.seed = 0                          # parameter init, data order and dropout RNG

    # Data.
    c.dataset = "imagenet2012"          # tfds name | "folder:/path" | "demo" (bundled photos)
    c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir (None: tfds default)
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 256                  # side of the square training crops, pixels
    c.crop_mode = "random_resized"      # random_resized | random (image_size crops, native scale)
    c.min_crop_scale = 0.5              # random_resized: crop side / short side, uniform in [s, 1]
    c.batch_size = 8                    # global batch (all processes and devices together)
    c.num_train_steps = 500_000

    # Tokenizer (models.vqgan.VQModel fields).
    c.model = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        z_channels=256, embed_dim=256, n_embed=1024, beta=0.25, l2_normalize_codes=False,
        dropout=0.0, norm_groups=32))
    # Rematerialize each ResnetBlock/AttnBlock in the backward pass (less activation memory,
    # about one more forward pass of compute).
    c.model.remat = False
    c.dtype = "float32"                 # compute dtype: float32 | bfloat16 (params stay float32)

    # PatchGAN discriminator (models.discriminators.NLayerDiscriminator).
    c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3))

    # Loss (Esser et al. 2021, eq. 5-7; taming's VQLPIPSWithDiscriminator).
    c.loss = ml_collections.ConfigDict(dict(
        disc_start=250_001,             # step at which the adversarial terms switch on
        disc_weight=0.8,                # scales the adaptive weight lambda
        disc_factor=1.0,                # weight of the adversarial terms once on
        disc_loss="hinge",              # hinge | vanilla
        codebook_weight=1.0,            # weight of the VQ loss
        perceptual_weight=1.0,          # weight of LPIPS (0 skips computing it in the step)
    ))

    # Adam for both generator and discriminator; lr = base_learning_rate * batch_size.
    c.optimizer = ml_collections.ConfigDict(dict(base_learning_rate=4.5e-6, b1=0.5, b2=0.9))

    # Device mesh: data x fsdp x tensor = number of devices; one of them may be -1 (the rest).
    # The batch is split over data and fsdp; parameters and optimizer states over fsdp.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical axis (on parameters and activations, see vqgan_jax/parallel.py) -> mesh axes.
    # Names without a rule, dims the mesh axes do not divide and arrays under 4096 elements
    # are replicated. Nothing here uses `tensor`: keep mesh.tensor=1 for the tokenizer.
    c.sharding_rules = TOKENIZER_RULES

    # Logging, evaluation, checkpoints (in steps).
    c.log_every_steps = 100
    c.eval_every_steps = 10_000         # reconstructions + metrics on held-out images
    c.num_eval_images = 16              # held-out images evaluated (demo: all held-out photos)
    c.checkpoint_every_steps = 5_000
    c.max_checkpoints_to_keep = 3
    # Steps whose loss or gradients are NaN/Inf are skipped (no update); this many in a row
    # stop the run with an error, leaving the last good checkpoint as it was.
    c.max_consecutive_nonfinite = 20
    return c


def transformer_config() -> ml_collections.ConfigDict:
    """Stage 2: a GPT over a frozen tokenizer's codes (Esser et al. 2021, sec. 3.2; taming's
    Net2NetTransformer), class-conditional ImageNet by default."""
    c = ml_collections.ConfigDict()
    c.stage = "transformer"             # which trainer main runs
    c.seed = 0                          # parameter init, data order, dropout, pkeep, class drop

    # The frozen stage-1 tokenizer: a workdir written by `python -m vqgan_jax.main` with a
    # tokenizer config (its latest checkpoint's generator parameters and config are read).
    c.tokenizer_workdir = ""

    # Data: images are cropped as in stage 1, then encoded to codes on the fly.
    c.dataset = "imagenet2012"          # tfds name | "folder:/path" | "demo" (bundled photos)
    c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir (None: default)
    c.train_split = "train"
    c.image_size = 256                  # crop side in pixels; code grid = image_size / f
    c.crop_mode = "random_resized"      # random_resized | random (see config_base.tokenizer_config)
    c.min_crop_scale = 0.5              # random_resized: crop side / short side in [s, 1]
    c.batch_size = 8                    # global batch (all processes and devices together)
    c.num_train_steps = 500_000

    # Conditioning (taming's cond stage): the tokens before the image codes.
    c.conditioning = "class"            # unconditional (start token) | class | image
    c.num_classes = 1000                # class: class ids in [0, num_classes); one more is null
    c.class_drop_prob = 0.1             # class: chance a label becomes the null class (CFG)
    c.cond_tokenizer_workdir = ""       # image: stage-1 workdir of the cond-stage tokenizer
    c.cond_image_size = 64              # image: the crop, resized to this side, is the condition
    c.pkeep = 1.0                       # chance an input code is kept (else a random code)

    # GPT (models.gpt.GPT fields; vocab_size and n_cond_tokens come from the tokenizers).
    c.model = ml_collections.ConfigDict(dict(
        block_size=256, n_layer=24, n_head=16, n_embd=1024, dropout=0.0))
    c.model.remat = False               # rematerialize each GPT block in the backward pass
    c.dtype = "float32"                 # compute dtype: float32 | bfloat16 (params stay float32)

    # AdamW (minGPT: weight decay on Dense kernels only); lr = base_learning_rate * batch_size.
    c.optimizer = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6, b1=0.9, b2=0.95, weight_decay=0.01))

    # Device mesh: data x fsdp x tensor = number of devices; one of them may be -1 (the rest).
    # tensor > 1 splits the GPT's heads, MLP and vocabulary (Megatron-style); the batch is
    # split over data and fsdp only.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical axis -> mesh axes (see tokenizer_config); the frozen tokenizers use the conv rules.
    c.sharding_rules = TRANSFORMER_RULES

    # Samples written to workdir/samples.png at the end (a row per class; num_per_row=0: none).
    c.sample = ml_collections.ConfigDict(dict(
        num_per_row=8, max_rows=8, top_k=600, top_p=0.92, temperature=1.0, guidance_scale=1.0))

    # Logging and checkpoints (in steps).
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.max_checkpoints_to_keep = 3
    # NaN/Inf steps are skipped; this many in a row stop the run (see tokenizer_config).
    c.max_consecutive_nonfinite = 20
    return c
