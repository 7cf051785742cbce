"""Default config fields for every recipe in configs/ (stage 1: tokenizer_config, stage 2:
transformer_config or maskgit_config; recipes override what differs) and the checks the
stages share.

Every field is read by some code; comments give units and meaning.
"""

import ml_collections

from vqgan_jax.models.vit_vqgan import VIT_SIZES
# Logical-axis rules, (logical name, mesh axis | mesh axes | None), first free match wins
# (flax.linen.logical_to_mesh_axes). Parameter names come from vqgan_jax/models.
_CONV_RULES = (
    ("conv_out", "fsdp"),               # conv kernels [kh, kw, in, out] and biases: out channels
    ("codebook_n", "fsdp"),             # the codebook [n_embed, embed_dim]: its rows
)
TOKENIZER_RULES = (
    ("activation_batch", ("data", "fsdp")),  # activations' batch axis
    ("embed", "fsdp"),                  # the ViT-VQGAN's model width (its matrices)
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

    # Tokenizer: "vqgan" (models.vqgan.VQModel, the conv VQGAN) | "vit_vqgan"
    # (models.vit_vqgan.ViTVQModel, Yu et al. 2021; see vit_vqgan_model()).
    c.arch = "vqgan"
    # The fields of config.arch's class (here VQModel's).
    c.model = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        z_channels=256, embed_dim=256, n_embed=1024, beta=0.25, l2_normalize_codes=False,
        dropout=0.0, norm_groups=32))
    # Rematerialize each ResnetBlock/AttnBlock in the backward pass (less activation memory,
    # about one more forward pass of compute).
    c.model.remat = False
    c.dtype = "float32"                 # compute dtype: float32 | bfloat16 (params stay float32)

    # Quantizer (models.quantizers.quantizer_spec); the codebook shape stays in config.model
    # (n_embed, embed_dim, beta, l2_normalize_codes). For fsq and lfq the codebook size is
    # derived and config.model.n_embed must equal it: prod(fsq_levels), 2 ** embed_dim.
    c.quantizer = ml_collections.ConfigDict(dict(
        kind="vq",                      # vq | ema_vq | gumbel | fsq | lfq
        ema_decay=0.99,                 # ema_vq: decay of the cluster-size / sum averages
        ema_epsilon=1e-5,               # ema_vq: Laplace smoothing of the cluster sizes
        restart_unused_steps=0,         # vq, ema_vq: re-seed a code unused this many train
                                        #   steps from the batch's encoder outputs (0: off)
        entropy_weight=0.0,             # vq, ema_vq, lfq: weight of per-sample entropy minus
                                        #   entropy_gamma * batch entropy (MAGVIT-v2 lfq: 0.1)
        entropy_temperature=0.01,       # vq, ema_vq, lfq: T of q = softmax(-||z - e||^2 / T)
        entropy_gamma=1.0,              # vq, ema_vq, lfq: weight of the batch entropy in it
        gumbel_tau_start=0.9,           # gumbel: temperature at step 0 (taming's f8 model)
        gumbel_tau_end=1e-6,            # gumbel: temperature after the anneal
        gumbel_anneal_steps=1_000_001,  # gumbel: steps of the cosine tau_start -> tau_end
        gumbel_kl_weight=1e-8,          # gumbel: weight of KL(softmax(logits) || uniform)
        fsq_levels=(8, 5, 5, 5),        # fsq: levels per channel (len = config.model.embed_dim)
    ))

    # Discriminator: kind picks the class; each reads only its own fields below.
    c.disc = ml_collections.ConfigDict(dict(
        kind="patchgan",                # patchgan (taming's) | stylegan (StyleGAN2's, ViT-VQGAN's)
        # patchgan (models.discriminators.NLayerDiscriminator): first conv width, depth.
        ndf=64, n_layers=3,
        # stylegan (models.discriminators.StyleGANDiscriminator): channels at resolution r are
        # min(channel_base // r, channel_max); minibatch-stddev group size and features.
        channel_base=32768, channel_max=512, mbstd_group_size=4, mbstd_num_features=1,
    ))

    # Loss (Esser et al. 2021, eq. 5-7; taming's VQLPIPSWithDiscriminator).
    c.loss = ml_collections.ConfigDict(dict(
        disc_start=250_001,             # step at which the adversarial terms switch on
        disc_weight=0.8,                # scales the adaptive weight lambda
        disc_factor=1.0,                # weight of the adversarial terms once on
        disc_loss="hinge",              # hinge | vanilla (taming's 0.5 BCE) | non_saturating (BCE)
        gen_loss="hinge",               # generator: hinge (-mean D, taming's) | vanilla (minimax)
                                        # | non_saturating (softplus(-D))
        adaptive_disc_weight=True,      # lambda of eq. 7 (True) or lambda = disc_weight (False)
        codebook_weight=1.0,            # weight of the VQ loss
        # Reconstruction terms (trainers.tokenizer.reconstruction_loss); weight 0: not computed.
        l1_weight=1.0,                  # mean |x - x_hat|
        l2_weight=0.0,                  # mean (x - x_hat)^2
        logit_laplace_weight=0.0,       # logit-Laplace NLL (losses.logit_laplace_loss)
        perceptual_weight=1.0,          # weight of LPIPS (0 skips computing it in the step)
        # Discriminator regularizers (0: off).
        r1_weight=0.0,                  # gamma of the R1 penalty gamma/2 E|grad_x D(x)|^2
        r1_every=16,                    # lazy R1: applied (times r1_every) when step % this == 0
        lecam_weight=0.0,               # LeCAM regularization weight (Tseng et al. 2021)
        lecam_ema_decay=0.999,          # decay of LeCAM's anchors (EMAs of D's outputs)
        # Generator EMA (0: off). When on, evaluation, stage 2 and vqgan_jax.evaluate use the
        # EMA weights (state.g_ema_params) instead of state.g_params.
        ema_decay=0.0,
    ))

    # Adam for both generator and discriminator; lr = base_learning_rate * batch_size, constant
    # (taming) or "cosine": linear warmup, then a half cosine to final_lr_fraction * lr at the end.
    c.optimizer = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6, b1=0.5, b2=0.9, lr_schedule="constant", warmup_steps=0,
        final_lr_fraction=0.0))

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


def llamagen_vq16_config() -> ml_collections.ConfigDict:
    """LlamaGen's VQ-16 tokenizer (Sun et al. 2024, "Autoregressive Model Beats Diffusion";
    FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py``, ``VQ_16``), 256x256.

    The model is taming's conv VQGAN f16 (ch 128, ch_mult (1, 1, 2, 2, 4), 2 ResnetBlocks a
    level, z_channels 256, GroupNorm(32, eps 1e-6), dropout 0) with 16384 l2-normalized codes of
    8 dimensions. LlamaGen puts attention at the lowest-resolution level (and in the middle),
    whatever the image size: here ``attn_resolutions=(image_size // 16,)``; a recipe that
    changes image_size must change it too (:mod:`vqgan_jax.interop.llamagen` checks).
    ``python -m vqgan_jax.convert --from_llamagen=vq_ds16_c2i.pt`` reads their weights into it.

    The training fields follow their ``vq_train.py`` defaults where we have the same knob: batch
    128 at lr 1e-4, Adam (0.9, 0.95), l2 reconstruction + LPIPS, PatchGAN from step 20,000 at a
    fixed weight 0.5 (no adaptive weight), 40 ImageNet epochs. Not reproduced: their gradient
    clipping at norm 1 and bf16 autocast.
    """
    c = tokenizer_config()
    c.image_size = 256
    c.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                   z_channels=256, embed_dim=8, n_embed=16384, beta=0.25,
                   l2_normalize_codes=True, dropout=0.0, norm_groups=32)
    c.min_crop_scale = 0.8              # their random_crop_arr: crop side / short side in [0.8, 1]
    c.batch_size = 128
    c.num_train_steps = 400_000         # 40 epochs of ImageNet's 1.28M images at batch 128
    c.optimizer.update(base_learning_rate=1e-4 / 128, b1=0.9, b2=0.95)
    c.loss.update(l1_weight=0.0, l2_weight=1.0, perceptual_weight=1.0, codebook_weight=1.0,
                  disc_weight=0.5, disc_start=20_000, adaptive_disc_weight=False)
    return c


def vit_vqgan_model(encoder: str = "small", decoder: str = "small", patch_size: int = 8,
                    embed_dim: int = 32, n_embed: int = 8192) -> ml_collections.ConfigDict:
    """``config.model`` for ``config.arch = "vit_vqgan"`` (models.vit_vqgan.ViTVQModel fields).

    Args:
      encoder, decoder: "small" | "base" | "large", Yu et al. 2021 table 1 (VIT_SIZES):
        ViT-VQGAN-SS is small/small, -SB small/base, -LL large/large.
      patch_size: side of the non-overlapping patches, = the downsampling factor.
      embed_dim: dimension of the factorized, l2-normalized codes (32 in the paper).
      n_embed: codebook size (8192 in the paper).
    """
    enc, dec = VIT_SIZES[encoder], VIT_SIZES[decoder]
    return ml_collections.ConfigDict(dict(
        patch_size=patch_size,
        enc_layers=enc["layers"], enc_width=enc["width"], enc_heads=enc["heads"],
        enc_mlp_dim=enc["mlp_dim"],
        dec_layers=dec["layers"], dec_width=dec["width"], dec_heads=dec["heads"],
        dec_mlp_dim=dec["mlp_dim"],
        embed_dim=embed_dim, n_embed=n_embed, beta=0.25, dropout=0.0, remat=False))


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


def maskgit_config() -> ml_collections.ConfigDict:
    """Stage 2, masked-token generation: a bidirectional transformer over a frozen tokenizer's
    codes, trained to predict masked codes (Chang et al. 2022, "MaskGIT", sec. 3.1-3.2);
    class-conditional ImageNet by default. ``python -m vqgan_jax.main`` runs
    :mod:`vqgan_jax.trainers.maskgit` for it."""
    c = ml_collections.ConfigDict()
    c.stage = "maskgit"                 # which trainer main runs
    c.seed = 0                          # parameter init, data order, dropout, masks, class drop

    # The frozen stage-1 tokenizer (as transformer_config): a stage-1 workdir.
    c.tokenizer_workdir = ""

    # Data: images are cropped as in stage 1, then encoded to codes on the fly.
    c.dataset = "imagenet2012"          # tfds name | "folder:/path" | "demo" (bundled photos)
    c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir (None: default)
    c.train_split = "train"
    c.image_size = 256                  # crop side in pixels; code grid = image_size / f
    c.crop_mode = "random_resized"      # random_resized | random (see config_base.tokenizer_config)
    c.min_crop_scale = 0.5              # random_resized: crop side / short side in [s, 1]
    c.batch_size = 256                  # global batch (all processes and devices together)
    c.num_train_steps = 1_500_000

    # Conditioning: the one token before the codes (models.maskgit.MaskGIT's token layout).
    c.conditioning = "class"            # class | unconditional (no image conditioning here)
    c.num_classes = 1000                # class: class ids in [0, num_classes); plus a null class
    c.class_drop_prob = 0.1             # class: chance a label becomes the null class (CFG)
    # Label smoothing of the masked-code cross-entropy, in [0, 1) (MaskGIT: 0.1).
    c.label_smoothing = 0.0

    # MaskGIT (models.maskgit.MaskGIT fields; vocab_size, seq_len and num_classes come from
    # the tokenizer, config.image_size and config.num_classes).
    c.model = ml_collections.ConfigDict(dict(n_layer=24, n_head=16, n_embd=768, dropout=0.1))
    c.model.remat = False               # rematerialize each block in the backward pass
    c.dtype = "float32"                 # compute dtype: float32 | bfloat16 (params stay float32)

    # AdamW as MaskGIT (b1 0.9, b2 0.96, weight decay 0.045), the decay on Dense kernels only
    # (as the GPT's); lr = base_learning_rate * batch_size, constant (no warmup or decay).
    c.optimizer = ml_collections.ConfigDict(dict(
        base_learning_rate=1e-4 / 256, b1=0.9, b2=0.96, weight_decay=0.045))

    # Device mesh and logical-axis rules: as transformer_config (same parameter axis names).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = TRANSFORMER_RULES

    # Samples written to workdir/samples.png at the end (a row per class; num_per_row=0: none):
    # MaskGIT's iterative decoding (sec. 3.2): num_steps parallel steps, codes drawn with
    # top_k (0: all) and temperature, kept by confidence with Gumbel noise scaled by
    # choice_temperature (annealed to 0), classifier-free guidance_scale (1: none) under
    # guidance_schedule ("constant" | "linear").
    c.sample = ml_collections.ConfigDict(dict(
        num_per_row=8, max_rows=8, num_steps=8, top_k=0, temperature=1.0,
        choice_temperature=4.5, guidance_scale=1.0, guidance_schedule="constant"))

    # Logging and checkpoints (in steps).
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.max_checkpoints_to_keep = 3
    # NaN/Inf steps are skipped; this many in a row stop the run (see tokenizer_config).
    c.max_consecutive_nonfinite = 20
    return c


def check_config(config: ml_collections.ConfigDict, num_devices: int, dtypes: dict) -> None:
    """Checks both stages share: ``config.dtype`` in ``dtypes``, a global batch the devices split
    evenly, step counts and intervals, ``max_consecutive_nonfinite``; ValueErrors name the field."""
    if config.dtype not in dtypes:
        raise ValueError(f"config.dtype={config.dtype!r}; use one of {sorted(dtypes)}.")
    if config.batch_size <= 0 or config.batch_size % num_devices:
        raise ValueError(f"config.batch_size={config.batch_size} (global) is not divisible by "
                         f"the {num_devices} devices the batch is split over.")
    if config.num_train_steps < 0:
        raise ValueError("config.num_train_steps must be >= 0.")
    for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        if config.get(field, 1) < 1:
            raise ValueError(f"config.{field}={config[field]} must be >= 1 (a number of steps).")
    if config.max_consecutive_nonfinite < 1:
        raise ValueError(f"config.max_consecutive_nonfinite={config.max_consecutive_nonfinite} "
                         "must be >= 1 (the number of NaN/Inf steps in a row that stops a run).")
