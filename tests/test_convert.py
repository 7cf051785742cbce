"""taming-transformers checkpoints <-> vqgan_jax: key-for-key round trips, forward passes equal
to PyTorch references written from the published architecture (tests/taming_reference.py),
the command line both ways, loading by the sampler and resuming by the trainer."""

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")  # the `test` extra pins torch==2.13.0 (CPU)

import taming_reference as ref  # noqa: E402
from conftest import ROOT, load_config, shrink  # noqa: E402
from vqgan_jax import workdir as workdir_lib  # noqa: E402
from vqgan_jax.interop import taming  # noqa: E402
from vqgan_jax.models import registry  # noqa: E402
from vqgan_jax.models.gpt import GPT  # noqa: E402
from vqgan_jax.models.vqgan import VQModel  # noqa: E402
from vqgan_jax.state import tokenizer as state1  # noqa: E402
from vqgan_jax.state import transformer as state2  # noqa: E402

TOL = 1e-4  # max |ours - torch| / max |torch|

# The tiny stage-1 recipe (tiny_tokenizer_config below), as command-line overrides.
TOKENIZER_FLAGS = ["image_size=32", "model.ch=32", "model.ch_mult=(1,2)",
                   "model.num_res_blocks=1", "model.attn_resolutions=(16,)",
                   "model.z_channels=8", "model.embed_dim=8", "model.n_embed=64",
                   "disc.ndf=8", "disc.n_layers=2"]
GPT_LAYOUT = dict(block_size=64, n_layer=2, n_head=4, n_embd=32)
NUM_CLASSES = 10


def tiny_tokenizer_config():
    """shrink(imagenet_f16) with two levels and attention at 16, as TOKENIZER_FLAGS: the
    conversion maps every kind of taming module (Downsample, Upsample, AttnBlock by level)."""
    config = shrink(load_config("imagenet_f16"))
    config.model.update(ch_mult=(1, 2), attn_resolutions=(16,))
    return config


def tiny_transformer_config():
    c = load_config("imagenet_cond_transformer")
    c.update(image_size=16, num_classes=NUM_CLASSES, dtype="float32", batch_size=8)
    c.model.update(dropout=0.0, **GPT_LAYOUT)
    return c


def torch_vqmodel(config, **kw) -> ref.VQModel:
    m = config.model
    return ref.VQModel(m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.z_channels,
                       config.image_size, m.embed_dim, m.n_embed, m.norm_groups,
                       config.disc.ndf, config.disc.n_layers, **kw).eval()


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def taming_vq():
    """A taming VQModel with random values in every tensor, and its state dict (numpy)."""
    config = tiny_tokenizer_config()
    model = torch_vqmodel(config)
    sd = {k: v.numpy().copy() for k, v in ref.randomize(model, seed=0).items()}
    return config, model, sd


def convert(sd, config):
    vq, disc = registry.build_models(config)
    reader = taming.StateDictReader(sd, "test.ckpt")
    converted = taming.tokenizer_from_state_dict(reader, vq, disc, config.image_size)
    reader.check_all_used()
    return converted, vq, disc


def test_round_trip_gives_back_every_tensor(taming_vq):
    config, _, sd = taming_vq
    converted, _, _ = convert(sd, config)
    back = taming.tokenizer_to_state_dict(converted["g_params"], converted["d_params"],
                                          converted["d_batch_stats"], step=5, lpips=False)
    lpips_keys = {k for k in sd if k.startswith(taming.LPIPS_PREFIX)}
    assert lpips_keys and set(back) == set(sd) - lpips_keys
    for key, value in back.items():
        assert value.shape == sd[key].shape and value.dtype == sd[key].dtype, key
        if not key.endswith("num_batches_tracked"):  # not kept; written as the step
            np.testing.assert_array_equal(value, sd[key], err_msg=key)
    # Spot-check layouts: OIHW convs, [n_embed, embed_dim] codebook, batch statistics.
    g = converted["g_params"]
    np.testing.assert_array_equal(g["encoder"]["down_1_attn_0"]["q"]["kernel"][0, 0],
                                  sd["encoder.down.1.attn.0.q.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(g["quantize"]["codebook"], sd["quantize.embedding.weight"])
    np.testing.assert_array_equal(converted["d_batch_stats"]["main_3"]["var"],
                                  sd["loss.discriminator.main.3.running_var"])


def test_export_loads_strictly_into_taming_layouts(taming_vq):
    config, _, sd = taming_vq
    converted, _, _ = convert(sd, config)
    full = taming.tokenizer_to_state_dict(converted["g_params"], converted["d_params"],
                                          converted["d_batch_stats"], step=5)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in full.items()}
    torch_vqmodel(config).load_state_dict(tensors, strict=True)  # with LPIPS + discriminator
    bare = taming.tokenizer_to_state_dict(converted["g_params"])
    torch_vqmodel(config, with_loss=False).load_state_dict(
        {k: torch.from_numpy(v) for k, v in bare.items()}, strict=True)


def test_forward_passes_match_pytorch(taming_vq):
    config, model, sd = taming_vq
    converted, vq, disc = convert(sd, config)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        z_e, z_q, idx = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
        x_hat = model.decode(z_q).permute(0, 2, 3, 1).numpy()
        logits = model.loss.discriminator(torch.from_numpy(x).permute(0, 3, 1, 2))
    z_e, z_q, idx = (t.numpy() for t in (z_e.permute(0, 2, 3, 1), z_q.permute(0, 2, 3, 1), idx))
    params = {"params": converted["g_params"]}
    ours_zq, aux = jax.jit(lambda p, x: vq.apply(p, x, method=VQModel.encode))(params, x)
    ours_xhat = jax.jit(lambda p, z: vq.apply(p, z, method=VQModel.decode))(params, z_q)
    errors = dict(z_e=rel_err(aux["z_e"], z_e), z_q=rel_err(ours_zq, z_q),
                  x_hat=rel_err(ours_xhat, x_hat))
    np.testing.assert_array_equal(aux["indices"], idx)
    d_logits = jax.jit(lambda v, x: disc.apply(v, x, train=False))(
        {"params": converted["d_params"], "batch_stats": converted["d_batch_stats"]}, x)
    errors["disc"] = rel_err(d_logits, logits.permute(0, 2, 3, 1).numpy())
    print("max relative errors vs torch:", errors)
    assert max(errors.values()) < TOL, errors


def test_bad_keys_are_named(taming_vq):
    config, _, sd = taming_vq
    missing = {k: v for k, v in sd.items() if k != "decoder.up.0.block.1.conv2.bias"}
    with pytest.raises(taming.ConversionError, match=r"'decoder\.up\.0\.block\.1\.conv2\.bias'"):
        convert(missing, config)
    misshapen = dict(sd, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(taming.ConversionError, match=r"'quant_conv\.weight' has shape \(8, 8, 3, 3\)"):
        convert(misshapen, config)
    unknown = dict(sd, **{"quantize.proj.weight": np.zeros((2,), np.float32)})
    with pytest.raises(taming.ConversionError, match=r"unknown key\(s\): 'quantize\.proj\.weight'"):
        convert(unknown, config)
    bigger = tiny_tokenizer_config()
    bigger.model.n_embed = 128  # the config does not describe the file
    with pytest.raises(taming.ConversionError, match="quantize.embedding.weight"):
        convert(sd, bigger)


def test_untrusted_pickles_are_refused_unless_trusted(taming_vq, tmp_path):
    _, _, sd = taming_vq
    path = str(tmp_path / "old_lightning.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
                "hparams": argparse.Namespace(lr=1e-4), "global_step": 3}, path)
    with pytest.raises(taming.ConversionError, match="--trust_pickle"):
        taming.load_state_dict(path)
    loaded, step = taming.load_state_dict(path, trust_pickle=True)
    assert step == 3 and set(loaded) == set(sd)


def torch_gpt(vocab: int) -> ref.GPT:
    return ref.GPT(vocab, **GPT_LAYOUT).eval()


def test_gpt_logits_match_mingpt():
    model = torch_gpt(64)
    sd = {k: v.numpy().copy() for k, v in ref.randomize(model, seed=1).items()}
    reader = taming.StateDictReader({"transformer." + k: v for k, v in sd.items()}, "net2net")
    cond = list(range(NUM_CLASSES)) + [None]
    gpt = GPT(vocab_size=64, n_cond_tokens=len(cond), **GPT_LAYOUT)
    params = taming.gpt_from_state_dict(reader, gpt, cond)
    reader.check_all_used()
    rng = np.random.default_rng(0)
    classes = np.array([3, 7])
    codes = rng.integers(0, 64, (2, 63))
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.concatenate([classes[:, None], codes], 1))).numpy()
    ours, _ = jax.jit(lambda p, t: gpt.apply({"params": p}, t))(params, jnp.asarray(np.concatenate(
        [64 + classes[:, None], codes], 1), jnp.int32))
    err = rel_err(ours, theirs)
    print("GPT logits max relative error vs torch:", err)
    assert err < TOL
    np.testing.assert_array_equal(params["wte"]["embedding"][64 + 3], sd["tok_emb.weight"][3])
    # A non-causal mask (minGPT's n_unmasked > 0) cannot be represented.
    sd_bad = dict({"transformer." + k: v for k, v in sd.items()})
    sd_bad["transformer.blocks.1.attn.mask"] = np.ones((1, 1, 64, 64), np.float32)
    with pytest.raises(taming.ConversionError, match=r"blocks\.1\.attn\.mask is not causal"):
        taming.gpt_from_state_dict(taming.StateDictReader(sd_bad, "net2net"), gpt, cond)


def run_convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vqgan_jax.convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_net2net_to_workdirs_loaded_by_the_sampler_and_back(tmp_path):
    """A Net2Net .ckpt through the CLI -> stage-2 + stage-1 workdirs; the sampler's loader reads
    them and reproduces minGPT's logits and taming's decoder; --to_taming gives back the VQModel
    tensors exactly."""
    config = tiny_tokenizer_config()
    vq_model = torch_vqmodel(config, with_loss=False)
    vq_sd = ref.randomize(vq_model, seed=2)
    gpt_model = torch_gpt(64)
    gpt_sd = ref.randomize(gpt_model, seed=3)
    sd = {**{"first_stage_model." + k: v for k, v in vq_sd.items()},
          **{"transformer." + k: v for k, v in gpt_sd.items()}}
    ckpt = tmp_path / "net2net.ckpt"
    torch.save({"state_dict": sd, "global_step": 11}, ckpt)
    result = run_convert(
        f"--from_taming={ckpt}", "--config=configs/imagenet_cond_transformer.py",
        "--config.image_size=16", f"--config.num_classes={NUM_CLASSES}", "--config.dtype=float32",
        *[f"--config.model.{k}={v}" for k, v in GPT_LAYOUT.items()],
        "--tokenizer_config=configs/imagenet_f16.py",
        *[f"--tokenizer_config.{f}" for f in TOKENIZER_FLAGS], f"--out={tmp_path / 'stage2'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote the transformer workdir" in result.stdout

    params, frozen, sc, saved = state2.load_for_sampling(str(tmp_path / "stage2"))
    assert saved.tokenizer_workdir == str(tmp_path / "stage2" / "tokenizer")
    assert sorted(os.listdir(tmp_path / "stage2" / "checkpoints")) == ["11"]
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 64, (2, 8, 8))
    tokens = np.concatenate([np.array([[5], [9]]), codes.reshape(2, -1)[:, :-1]], 1)
    with torch.no_grad():
        theirs = gpt_model(torch.from_numpy(tokens)).numpy()
        z_q = vq_model.quantize.embedding(torch.from_numpy(codes)).permute(0, 3, 1, 2)
        images = vq_model.decode(z_q).permute(0, 2, 3, 1).numpy()
    prefix = sc.conditioning.class_prefix(jnp.array([5, 9]))
    ours, _ = jax.jit(lambda p, t: sc.gpt.apply({"params": p}, t))(params, jnp.concatenate(
        [prefix, jnp.asarray(codes.reshape(2, -1)[:, :-1], jnp.int32)], 1))
    ours_images = jax.jit(lambda p, c: sc.vq.apply({"params": p}, c,
                                                   method=VQModel.decode_from_indices))(
        frozen["tokenizer"], jnp.asarray(codes))
    errors = dict(logits=rel_err(ours, theirs), decoded=rel_err(ours_images, images))
    print("CLI-converted workdirs, max relative errors vs torch:", errors)
    assert max(errors.values()) < TOL, errors

    out = tmp_path / "back.ckpt"
    result = run_convert(f"--to_taming={out}", f"--workdir={tmp_path / 'stage2' / 'tokenizer'}",
                         "--taming_loss=dummy")
    assert result.returncode == 0, result.stderr[-3000:]
    # Quiet: no orbax INFO internals, no torch warning about read-only arrays from JAX.
    assert "not writable" not in result.stderr and "orbax" not in result.stderr, result.stderr
    back = torch.load(out, weights_only=True)["state_dict"]
    fresh = torch_vqmodel(config, with_loss=False)
    fresh.load_state_dict(back, strict=True)
    for key, value in vq_sd.items():
        assert torch.equal(back[key], value), key

    with pytest.raises(taming.ConversionError, match="exports a stage-1 .tokenizer. workdir"):
        taming.read_tokenizer_workdir(str(tmp_path / "stage2"))


def test_cli_vqmodel_workdir_resumes_training(taming_vq, tmp_path):
    """A taming VQModel (with its discriminator and LPIPS keys) through the CLI; the trainer's
    resume (workdir.restore_state, as tokenizer.train_and_evaluate calls it) reads the converted
    checkpoint, which has no data-iterator item, onto the mesh with the data pipeline built."""
    from vqgan_jax import parallel
    from vqgan_jax.data import pipeline, sources

    config, _, sd = taming_vq
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
                "global_step": 7}, ckpt)
    workdir = tmp_path / "stage1"
    result = run_convert(f"--from_taming={ckpt}", "--config=configs/imagenet_f16.py",
                         *[f"--config.{f}" for f in TOKENIZER_FLAGS], f"--out={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(taming.ConversionError, match="already holds checkpoints"):
        taming.convert_from_taming(str(ckpt), config, str(workdir))

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    config = tiny_tokenizer_config()
    config.dataset = f"folder:{images}"
    sc = state1.build_step_config(config)
    mesh = parallel.create_mesh(config.mesh.data, config.mesh.fsdp)
    train_iter = pipeline.train_iterator(
        sources.get_source(config.dataset, config.train_split), image_size=32,
        global_batch_size=8, seed=0, min_crop_scale=0.5, crop_mode="random_resized")
    abstract = jax.eval_shape(lambda k: state1.init_state(k, sc=sc, image_size=32),
                              jax.random.key(0))
    manager = workdir_lib.checkpoint_manager(str(workdir), max_to_keep=1,
                                             item_names=("state", "data", "config"))
    assert manager.latest_step() == 7
    state = workdir_lib.restore_state(manager, 7, workdir_lib.abstract_like(
        abstract, parallel.state_shardings(abstract, mesh)), train_iter)
    manager.close()
    assert int(state.step) == 7
    np.testing.assert_array_equal(state.g_params["quantize"]["codebook"],
                                  sd["quantize.embedding.weight"])
    np.testing.assert_array_equal(state.d_batch_stats["main_3"]["mean"],
                                  sd["loss.discriminator.main.3.running_mean"])
    assert all(np.all(np.asarray(m) == 0) for m in jax.tree.leaves(state.g_opt_state)
               if np.asarray(m).ndim)  # fresh Adam moments
    assert next(train_iter)["image"].shape == (8, 32, 32, 3)
    assert workdir_lib.read_config(str(workdir), "--workdir").model.n_embed == 64


@pytest.mark.parametrize("ema_decay, lecam_weight", [(0.0, 0.0), (0.5, 0.1)])
def test_converted_workdir_holds_the_state_training_would_make(taming_vq, tmp_path, ema_decay,
                                                               lecam_weight):
    """The converted state is made by the trainer's own init: a generator EMA (a copy of the
    converted weights) and LeCAM anchors (zeros) exactly when the config asks for them, so a
    run of that config resumes from it."""
    config, _, sd = taming_vq
    config = ml_collections.ConfigDict(config.to_dict())
    config.loss.update(ema_decay=ema_decay, lecam_weight=lecam_weight)
    converted, _, _ = convert(sd, config)
    workdir = taming.write_tokenizer_workdir(str(tmp_path / "run"), config, converted, step=3)
    sc = state1.build_step_config(config)
    abstract = jax.eval_shape(lambda k: state1.init_state(k, sc=sc, image_size=32),
                              jax.random.key(0))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = workdir_lib.abstract_like(abstract, jax.tree.map(lambda _: one_device, abstract))
    manager = workdir_lib.checkpoint_manager(workdir, max_to_keep=1, item_names=("state",))
    state = workdir_lib.restore_state(manager, 3, target, None)
    manager.close()
    assert (state.g_ema_params is None) == (ema_decay == 0)
    assert (state.lecam_ema is None) == (lecam_weight == 0)
    if ema_decay:
        jax.tree.map(np.testing.assert_array_equal, state.g_ema_params, converted["g_params"])
        np.testing.assert_array_equal(state.lecam_ema, np.zeros(2, np.float32))
    np.testing.assert_array_equal(state.g_params["quantize"]["codebook"],
                                  sd["quantize.embedding.weight"])
    assert workdir_lib.read_config(workdir, "--workdir").loss.ema_decay == ema_decay


def test_a_config_that_fails_validation_converts_to_nothing(taming_vq, tmp_path):
    """Converting checks the config as training would (``validate_config`` of
    vqgan_jax.state.tokenizer / .transformer) before anything is written: the ValueError names
    the field and no workdir is left behind."""
    config, _, sd = taming_vq
    config = ml_collections.ConfigDict(config.to_dict())
    config.loss.r1_every = 0
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, ckpt)
    with pytest.raises(ValueError, match=r"config\.loss\.r1_every=0"):
        taming.convert_from_taming(str(ckpt), config, str(tmp_path / "stage1"))
    gpt_config = tiny_transformer_config()
    gpt_config.pkeep = 0.0
    with pytest.raises(ValueError, match=r"config\.pkeep=0\.0"):
        taming.write_transformer_workdir(str(tmp_path / "stage2"), gpt_config, {}, step=0)
    assert os.listdir(tmp_path) == ["last.ckpt"]
