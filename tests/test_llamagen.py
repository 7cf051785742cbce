"""LlamaGen's tokenizer (VQ-16) <-> vqgan_jax: the exact parameter count and every key of the
full-size model, forward passes equal to a PyTorch reference written from the published
architecture (tests/llamagen_reference.py), bit-exact round trips, strict loading by their
layout, errors naming the key or field, and the command line both ways."""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `test` extra pins torch==2.13.0 (CPU)

import llamagen_reference as ref  # noqa: E402
import taming_reference  # noqa: E402
from conftest import load_config  # noqa: E402
from test_convert import rel_err, run_convert  # noqa: E402
from vqgan_jax.data import pipeline  # noqa: E402
from vqgan_jax.interop import llamagen, taming  # noqa: E402
from vqgan_jax.models import registry  # noqa: E402
from vqgan_jax.models.vqgan import VQModel  # noqa: E402

VQ16_PARAMS = 71_883_403   # sum of numel over LlamaGen VQ_16().parameters()

# A tiny LlamaGen VQModel: 32x32 images, f = 2, attention (and the middle) at 16x16.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=16, codebook_size=64,
            codebook_embed_dim=8)
TINY_FLAGS = ["image_size=32", "model.ch=32", "model.ch_mult=(1,2)", "model.num_res_blocks=2",
              "model.z_channels=16", "model.n_embed=64", "model.embed_dim=8",
              "model.attn_resolutions=(16,)", "disc.ndf=8", "disc.n_layers=2"]

# Max |ours - torch| / max |torch| for float32 forward passes. Each conv output is a sum of up
# to 9 * 64 = 576 products rounded at 2**-24 ~ 6e-8 relative; summed in another order (XLA's
# vs PyTorch's conv kernels, rsqrt vs sqrt-and-divide in GroupNorm and the l2 normalization)
# the two differ by ~sqrt(576) * 6e-8 ~ 1.4e-6 of the output's scale per layer, and the ~20
# layers of the encoder or decoder add such errors (GroupNorm rescales them with the signal).
# That is a few 1e-6 (taming's measured: below 4e-6); 1e-4 leaves 25x room, while one wrongly
# mapped or transposed tensor gives an error of order 1.
TOL = 1e-4


def tiny_config():
    c = load_config("llamagen_vq16")
    c.image_size = 32
    c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=16, n_embed=64,
                   embed_dim=8, attn_resolutions=(16,))
    c.disc.update(ndf=8, n_layers=2)
    return c


@pytest.fixture(scope="module")
def llamagen_vq():
    """A tiny LlamaGen VQModel with random values in every tensor, and its state dict (numpy).
    ``quantize.codebook_used`` holds noise too: it must be skipped, not converted."""
    model = ref.VQModel(**TINY).eval()
    sd = {k: v.numpy().copy() for k, v in taming_reference.randomize(model, seed=0).items()}
    return model, sd


def convert(sd, config=None):
    return llamagen.tokenizer_from_state_dict(taming.StateDictReader(sd, "vq.pt"),
                                              config or tiny_config())


@pytest.mark.parametrize("name, ch_mult, total", [("VQ-16", (1, 1, 2, 2, 4), VQ16_PARAMS),
                                                   ("VQ-8", (1, 2, 2, 4), 70_109_835)])
def test_full_size_parameter_counts_and_every_key(name, ch_mult, total):
    """LlamaGen's VQ_16 / VQ_8 built on the meta device (no memory): the layout read off their
    state-dict shapes is configs/llamagen_vq16.py's for VQ-16; our model of it (built
    abstractly) has exactly their parameter count, and every one of their keys is one of ours
    with its shape."""
    with torch.device("meta"):
        theirs = ref.VQModel(ch_mult=ch_mult)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    config = llamagen.config_from_state_dict(  # zero-stride views: only shapes are read
        {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}, name)
    if name == "VQ-16":
        assert config.to_dict() == load_config("llamagen_vq16").to_dict()
    vq, _ = registry.build_models(config)
    ours = jax.eval_shape(lambda: nn.meta.unbox(vq.init(
        jax.random.key(0), jnp.zeros((1, 256, 256, 3)))["params"]))
    assert sum(x.size for x in jax.tree.leaves(ours)) == n_theirs == total
    assert shapes.pop(llamagen.CODEBOOK_USED) == (llamagen.CODEBOOK_USED_SIZE,)  # a buffer
    maps = llamagen.tensor_maps(ours, len(ch_mult))
    assert {m.key: m.torch_shape for m in maps} == shapes
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    # Where the layouts differ from taming's: the decoder's level order; attention only at
    # the lowest resolution (16x16 or 32x32 for 256x256 images).
    n = len(ch_mult)
    assert {m.path[1:3]: m.key for m in maps}[("decoder", f"up_{n - 1}_attn_2")].startswith(
        "decoder.conv_blocks.0.attn.2.")
    assert {k.split(".attn.")[0] for k in shapes if ".conv_blocks." in k and ".attn." in k} == {
        f"encoder.conv_blocks.{n - 1}", "decoder.conv_blocks.0"}


def test_round_trip_is_bit_exact_and_loads_strictly(llamagen_vq):
    _, sd = llamagen_vq
    config = tiny_config()
    g_params = convert(sd, config)
    np.testing.assert_array_equal(g_params["quantize"]["codebook"], sd["quantize.embedding.weight"])
    np.testing.assert_array_equal(  # our top level up_0 is their last decoder level, OIHW
        g_params["decoder"]["up_0_block_2"]["conv1"]["kernel"],
        sd["decoder.conv_blocks.1.res.2.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(g_params["encoder"]["mid"]["attn_1"]["norm"]["scale"],
                                  sd["encoder.mid.1.norm.weight"])
    back = llamagen.llamagen_state_dict(config, g_params)
    assert set(back) == set(sd)
    for key, value in back.items():
        assert value.shape == sd[key].shape and value.dtype == sd[key].dtype, key
        if key != llamagen.CODEBOOK_USED:
            np.testing.assert_array_equal(value, sd[key], err_msg=key)
    assert not back[llamagen.CODEBOOK_USED].any()
    fresh = ref.VQModel(**TINY)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_forward_passes_match_pytorch(llamagen_vq):
    model, sd = llamagen_vq
    config = tiny_config()
    vq, _ = registry.build_models(config)
    params = {"params": convert(sd, config)}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        h, z_q, idx = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2))
        x_hat = model.decode(z_q).permute(0, 2, 3, 1).numpy()
        from_codes = model.decode_code(idx).permute(0, 2, 3, 1).numpy()
    h, z_q, idx = h.permute(0, 2, 3, 1).numpy(), z_q.permute(0, 2, 3, 1).numpy(), idx.numpy()
    ours_zq, aux = jax.jit(lambda p, x: vq.apply(p, x, method=VQModel.encode))(params, x)
    ours_xhat = jax.jit(lambda p, z: vq.apply(p, z, method=VQModel.decode))(params, z_q)
    ours_codes = jax.jit(lambda p, i: vq.apply(p, i, method=VQModel.decode_from_indices))(
        params, idx)
    np.testing.assert_array_equal(aux["indices"], idx)
    assert len(np.unique(idx)) > 8  # many codes chosen: the lookup is really compared
    errors = dict(z_e=rel_err(aux["z_e"], h), z_q=rel_err(ours_zq, z_q),
                  x_hat=rel_err(ours_xhat, x_hat), decode_code=rel_err(ours_codes, from_codes))
    print("max relative errors vs LlamaGen's layout in torch:", errors)
    assert max(errors.values()) < TOL, errors


def test_bad_keys_and_configs_are_named(llamagen_vq):
    _, sd = llamagen_vq
    key = "decoder.conv_blocks.0.attn.1.proj_out.bias"
    with pytest.raises(taming.ConversionError, match=rf"no tensor '{key}'".replace(".", r"\.")):
        convert({k: v for k, v in sd.items() if k != key})
    with pytest.raises(taming.ConversionError, match=r"'quant_conv\.weight' has shape \(8, 8\)"):
        convert(dict(sd, **{"quant_conv.weight": np.zeros((8, 8), np.float32)}))
    unknown = dict(sd, **{"quantize.proj.weight": np.zeros((2,), np.float32),
                          "encoder.conv_blocks.1.downsample.conv.weight": np.zeros((1,))})
    with pytest.raises(taming.ConversionError, match=r"2 unknown key\(s\): 'encoder\.conv_blocks"
                       r"\.1\.downsample\.conv\.weight', 'quantize\.proj\.weight'"):
        convert(unknown)
    bad = tiny_config()
    bad.model.update(norm_groups=8, l2_normalize_codes=False, attn_resolutions=(32, 16))
    with pytest.raises(taming.ConversionError) as e:
        convert(sd, bad)
    for fix in (r"--config.model.l2_normalize_codes=False", "--config.model.norm_groups=8",
                "--config.model.attn_resolutions=(32, 16)", "set (16,)"):
        assert fix in str(e.value)
    # The export refuses a model LlamaGen's code would compute differently (the demo's).
    with pytest.raises(taming.ConversionError, match=r"config\.model\.norm_groups=8 .* "
                       r"config\.model\.attn_resolutions=\(\) .*set \(16,\)"):
        llamagen.llamagen_state_dict(load_config("demo"), {})


def test_files_in_memory_with_the_layout_read_off_the_file(llamagen_vq, tmp_path):
    """tokenizer_from_llamagen: their file format ({"model": ..., "steps": ...}), no config
    needed; a training checkpoint's pickled args are refused unless trusted."""
    _, sd = llamagen_vq
    path = tmp_path / "vq.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "steps": 9}, path)
    config, g_params = llamagen.tokenizer_from_llamagen(str(path))
    m = config.model
    assert (m.ch, m.ch_mult, m.num_res_blocks, m.z_channels, m.n_embed, m.embed_dim) == (
        32, (1, 2), 2, 16, 64, 8)
    assert (config.image_size, m.attn_resolutions, m.l2_normalize_codes) == (256, (128,), True)
    expected = convert(sd)
    jax.tree.map(np.testing.assert_array_equal, g_params, expected)
    _, g32 = llamagen.tokenizer_from_llamagen(str(path), tiny_config())
    jax.tree.map(np.testing.assert_array_equal, g32, expected)
    # The public API reads the same file (by its suffix) and encodes with those weights.
    import vqgan_jax
    tok = vqgan_jax.load_tokenizer(path, config=tiny_config())
    images = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    vq, _ = registry.build_models(tiny_config())
    codes = vq.apply({"params": expected}, pipeline.to_unit_range(images),
                     method=VQModel.encode_to_indices)
    np.testing.assert_array_equal(tok.encode(images), codes)

    trained = tmp_path / "0400000.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "steps": 5,
                "args": argparse.Namespace(vq_model="VQ-16")}, trained)
    with pytest.raises(taming.ConversionError, match="--trust_pickle"):
        llamagen.tokenizer_from_llamagen(str(trained))
    llamagen.tokenizer_from_llamagen(str(trained), trust_pickle=True)
    with pytest.raises(taming.ConversionError, match=r"no tensor 'encoder\.conv_blocks\.0\.res"
                       r"\.0\.conv1\.weight'; is this a LlamaGen VQModel"):
        llamagen.config_from_state_dict({"x": np.zeros(1)}, "x.pt")


@pytest.mark.start_early
def test_cli_both_ways(llamagen_vq, tmp_path):
    """--from_llamagen writes a stage-1 workdir (step = the file's steps) holding exactly the
    converted parameters; --to_llamagen gives back every tensor bit for bit, in a file their
    layout loads with strict=True."""
    _, sd = llamagen_vq
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "steps": 9}, path)
    workdir = tmp_path / "stage1"
    result = run_convert(f"--from_llamagen={path}", "--config=configs/llamagen_vq16.py",
                         *[f"--config.{f}" for f in TINY_FLAGS], f"--out={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = taming.read_tokenizer_workdir(str(workdir))
    assert saved["step"] == 9
    jax.tree.map(np.testing.assert_array_equal, saved["g_params"], convert(sd))

    out = tmp_path / "back.pt"
    result = run_convert(f"--to_llamagen={out}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    back = torch.load(out, weights_only=True)["model"]
    ref.VQModel(**TINY).load_state_dict(back, strict=True)
    for key, value in sd.items():
        if key != llamagen.CODEBOOK_USED:
            assert np.array_equal(back[key].numpy(), value), key
