"""The public API (vqgan_jax.load_tokenizer / load_generator) on conftest's tiny workdirs: a
tokenizer (f2, 16 codes) and a class-conditional GPT over it (2 classes, 4x4 codes). The test
process has 8 CPU devices, so every batch below (3, 4) is padded and cut back."""

import re

import jax
import ml_collections
import numpy as np
import pytest

import vqgan_jax
from vqgan_jax import api, cli, metrics, workdir
from vqgan_jax.data import pipeline
from vqgan_jax.models import registry
from vqgan_jax.samplers import autoregressive
from vqgan_jax.state import transformer as state2


@pytest.fixture(scope="module")
def tok(tokenizer_workdir):
    return vqgan_jax.load_tokenizer(tokenizer_workdir)


@pytest.fixture(scope="module")
def gen(gpt_run):
    return vqgan_jax.load_generator(gpt_run[1])


def test_pad_batch_pads_with_the_last_row_and_cuts_back():
    x = np.arange(3)[:, None] * np.ones((3, 2))
    padded = api.pad_batch(x, 8)
    assert padded.shape == (8, 2) and np.all(padded[3:] == 2) and np.all(padded[:3] == x)
    assert api.pad_batch(x, 3) is x and api.pad_batch(x, 1) is x


def test_encode_decode_match_the_model(tok, tokenizer_workdir):
    assert (tok.downsample_factor, tok.n_embed) == (2, 16)
    assert tok.config.stage == "tokenizer" and tok.mesh.devices.size == jax.local_device_count()
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
    codes = tok.encode(images)  # 3 images on 8 devices; 8x12 is not the training size (8x8)
    assert codes.shape == (3, 4, 6) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 16
    x = pipeline.to_unit_range(images)
    expected = tok.model.apply({"params": tok.params}, x, method="encode_to_indices")
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(tok.encode(x), codes)  # float32 in [-1, 1] gives the same

    decoded = tok.decode(codes)
    assert decoded.shape == (3, 8, 12, 3) and decoded.dtype == np.uint8
    x_hat = tok.model.apply({"params": tok.params}, codes, method="decode_from_indices")
    np.testing.assert_array_equal(decoded, metrics.to_uint8(x_hat))
    np.testing.assert_array_equal(tok.decode(codes[:1].astype(np.int64)), decoded[:1])

    same = vqgan_jax.load_tokenizer(tokenizer_workdir, step=1)
    np.testing.assert_array_equal(same.encode(images[:1]), codes[:1])


def _no_program(*args):
    raise AssertionError("a jitted program ran although the arguments were bad")


@pytest.mark.parametrize("images, message", [
    (np.zeros((8, 8, 3), np.uint8), r"images has shape \(8, 8, 3\).*images\[None\]"),
    (np.zeros((1, 8, 8, 4), np.uint8), r"images has 4 channels.*RGB"),
    (np.zeros((1, 8, 7, 3), np.uint8), r"8x7 pixels.*downsampling factor 2.*8x6"),
    (np.full((1, 8, 8, 3), 2.0, np.float32), r"floats in \[2, 2\].*\[-1, 1\]"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), r"must lie in \[-1, 1\]"),
    (np.zeros((1, 8, 8, 3), np.int64), r"images has dtype int64.*uint8"),
])
def test_encode_refuses_bad_images_before_compiling(tok, monkeypatch, images, message):
    monkeypatch.setattr(tok, "_encode", _no_program)
    with pytest.raises(ValueError, match=message):
        tok.encode(images)


@pytest.mark.parametrize("codes, message", [
    (np.zeros((4, 4), np.int32), r"codes has shape \(4, 4\).*codes\[None\]"),
    (np.zeros((1, 4, 4), np.float32), r"codes has dtype float32"),
    (np.full((1, 4, 4), 16, np.int32), r"values in \[16, 16\].*n_embed=16.*\[0, 16\)"),
    (np.full((1, 4, 4), -1, np.int32), r"values in \[-1, -1\]"),
])
def test_decode_refuses_bad_codes_before_compiling(tok, monkeypatch, codes, message):
    monkeypatch.setattr(tok, "_decode", _no_program)
    with pytest.raises(ValueError, match=message):
        tok.decode(codes)


def test_load_errors_name_the_path_and_the_fix(tokenizer_workdir, gpt_run, tmp_path):
    with pytest.raises(ValueError, match=r"path=.*missing' does not exist; pass a stage-1"):
        vqgan_jax.load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"does not exist; pass a stage-2 workdir"):
        vqgan_jax.load_generator(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"path=.* holds no checkpoint.*train that stage"):
        vqgan_jax.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"step=7: .*no checkpoint at that step \(it has \[1\]\)"):
        vqgan_jax.load_tokenizer(tokenizer_workdir, step=7)
    with pytest.raises(ValueError, match=r"stage-2 \(transformer\) workdir; load it with "
                       r"vqgan_jax.load_generator, or pass its tokenizer workdir"):
        vqgan_jax.load_tokenizer(gpt_run[1])
    with pytest.raises(ValueError, match=r"stage-1 \(tokenizer\) workdir; load it with "
                       r"vqgan_jax.load_tokenizer"):
        vqgan_jax.load_generator(tokenizer_workdir)
    config = workdir.read_config(tokenizer_workdir, "test")
    with pytest.raises(ValueError, match=r"config= is for checkpoint files"):
        vqgan_jax.load_tokenizer(tokenizer_workdir, config=config)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"is a \.txt file; pass .*\(\.ckpt, \.pt\)"):
        vqgan_jax.load_tokenizer(tmp_path / "notes.txt")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"taming checkpoint: pass config="):
        vqgan_jax.load_tokenizer(tmp_path / "model.ckpt")


def test_taming_ckpt_loads_in_memory_with_the_same_codes(tok, tmp_path):
    pytest.importorskip("torch")
    from vqgan_jax.interop import taming

    path = tmp_path / "vqgan.ckpt"
    taming.save_state_dict(str(path), taming.tokenizer_to_state_dict(jax.device_get(tok.params)))
    config = ml_collections.ConfigDict(tok.config.to_dict())
    from_file = vqgan_jax.load_tokenizer(path, config=config)
    assert not list(tmp_path.glob("**/checkpoints"))  # converted in memory, nothing written
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(from_file.encode(images), tok.encode(images))
    config.stage = "transformer"
    with pytest.raises(taming.ConversionError, match="goes with a stage-1 config"):
        vqgan_jax.load_tokenizer(path, config=config)


def test_missing_torch_names_the_extra(monkeypatch):
    from vqgan_jax.interop import taming
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch fails
    with pytest.raises(taming.ConversionError, match=re.escape("pip install 'vqgan_jax[torch]'")):
        taming.load_state_dict("any.ckpt")


def test_sample_is_the_sampler_padded_and_seeded(gen, gpt_run):
    """Generator.sample = the existing sampler (KV cache) + decode, run on 8 devices with the
    batch of 4 padded to 8: the same images as sample_images draws unpadded on one device."""
    images = gen.sample(class_ids=[0, 1], num=2, top_k=4, top_p=0.9, seed=1)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    params, frozen, sc, _ = state2.load_for_sampling(str(gpt_run[1]))
    prefix = autoregressive.class_rows(sc.conditioning, [0, 1], 2)
    expected = autoregressive.sample_images(params, frozen, sc, prefix, jax.random.key(1),
                                            top_k=4, top_p=0.9)
    np.testing.assert_array_equal(images, metrics.to_uint8(expected))
    np.testing.assert_array_equal(gen.sample(class_ids=[0, 1], num=2, top_k=4, top_p=0.9,
                                             seed=1), images)
    assert not np.array_equal(gen.sample(class_ids=[0, 1], num=2, top_k=4, top_p=0.9,
                                         seed=2), images)


def test_sample_beyond_the_training_grid_with_guidance(gen):
    images = gen.sample(class_ids=[1], num=3, guidance_scale=2.0, height=12, width=10, seed=0)
    assert images.shape == (3, 12, 10, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_ids=[2]), r"class_ids=\[2\]: give class ids in \[0, 2\)"),
    (dict(class_ids=None), r"class_ids=\[\]: give class ids in \[0, 2\)"),
    (dict(class_ids=[0], num=0), r"num=0"),
    (dict(class_ids=[0], top_k=-1), r"top_k=-1"),
    (dict(class_ids=[0], top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(class_ids=[0], temperature=0.0), r"temperature=0.0 must be > 0"),
    (dict(class_ids=[0], height=9), r"height=9 pixels; use a multiple of .* factor 2 of at "
                                     r"least the training size 8"),
    (dict(class_ids=[0], width=6), r"width=6 pixels"),
    (dict(class_ids=[0], num_steps=8), r"num_steps=8 applies to MaskGIT generators"),
    (dict(class_ids=[0], choice_temperature=1.0), r"choice_temperature=1.0 applies to MaskGIT"),
    (dict(class_ids=[0], guidance_scale=2.0, guidance_schedule="linear", guidance_power=-1.0),
     r"power=-1.0"),
])
def test_sample_refuses_bad_arguments_before_compiling(gen, monkeypatch, kwargs, message):
    monkeypatch.setattr(gen, "_program", _no_program)
    with pytest.raises(ValueError, match=message):
        gen.sample(**kwargs)


def test_class_ids_given_to_an_unconditional_model():
    with pytest.raises(ValueError, match=r"class_ids=\[0\] was given but the model is "
                       "unconditional"):
        autoregressive.class_rows(registry.Conditioning("unconditional", vocab_size=16), [0], 1)


def test_console_script_dispatches_and_names_its_subcommands(capsys):
    with pytest.raises(SystemExit, match=r"(?s)unknown subcommand 'sampel'.*train,sample,evaluate"):
        cli.main(["sampel"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2 and "usage: vqgan-jax" in capsys.readouterr().out
