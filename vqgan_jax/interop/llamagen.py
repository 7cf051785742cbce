"""LlamaGen's image tokenizers <-> vqgan_jax's conv VQGAN (Sun et al. 2024).

LlamaGen (FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py``) releases its
``VQModel`` as ``{"model": state_dict, ...}`` (e.g. ``vq_ds16_c2i.pt``, their VQ-16: 16384
l2-normalized codes of 8 dimensions). Its encoder and decoder are taming's, tensor for tensor
(GroupNorm(32, eps 1e-6), swish, the same ResnetBlock / AttnBlock / Downsample / Upsample), so
they load into :class:`vqgan_jax.models.vqgan.VQModel`; the key names differ. Every module is
mapped explicitly (:func:`llamagen_module_path`; ``n`` levels, ``i`` our level index):

* ``encoder.conv_in``, ``.norm_out``, ``.conv_out`` <-> ``encoder/conv_in``, ``norm_out``,
  ``conv_out`` (the same in the decoder);
* ``encoder.conv_blocks.{i}.res.{j}`` <-> ``encoder/down_{i}_block_{j}``;
  ``encoder.conv_blocks.{i}.attn.{j}`` <-> ``encoder/down_{i}_attn_{j}``;
  ``encoder.conv_blocks.{i}.downsample.conv`` <-> ``encoder/down_{i}_downsample/conv``;
* ``{en,de}coder.mid.0`` / ``.mid.1`` / ``.mid.2`` <-> ``{en,de}coder/mid/block_1`` /
  ``attn_1`` / ``block_2``;
* ``decoder.conv_blocks.{n-1-i}.res.{j}`` <-> ``decoder/up_{i}_block_{j}``;
  ``decoder.conv_blocks.{n-1-i}.attn.{j}`` <-> ``decoder/up_{i}_attn_{j}``;
  ``decoder.conv_blocks.{n-1-i}.upsample.conv`` <-> ``decoder/up_{i}_upsample/conv``;
* ``quant_conv``, ``post_quant_conv`` <-> the same;
* ``quantize.embedding.weight [K, D]`` <-> ``quantize/codebook [K, D]`` (raw rows: both
  normalize at use);
* ``quantize.codebook_used [65536]``, a training-time log of recent code indices: skipped on
  reading, written as zeros.

Inside a block the names are the same as taming's and ours (``norm1, conv1, norm2, conv2,
nin_shortcut``; ``norm, q, k, v, proj_out``); tensors as in :mod:`vqgan_jax.interop.taming`
(OIHW <-> HWIO convs, GroupNorm ``weight`` <-> ``scale``). Where LlamaGen's layout differs
from taming's: its decoder lists its levels in the order it runs them (``conv_blocks.0`` is the
lowest resolution; taming's ``up.0`` is the highest), the middle is a ModuleList (``mid.0-2``
for taming's ``mid.block_1 / attn_1 / block_2``), and attention sits at the lowest-resolution
level whatever the image size (taming: at ``attn_resolutions``), which our config expresses as
``attn_resolutions=(image_size // f,)``.

Their quantizer l2-normalizes the encoder outputs and the codebook before the nearest-code
lookup and returns the normalized code, as ours does with ``l2_normalize_codes=True``. There is
no discriminator in a released file: a converted workdir gets a fresh one.

torch is imported only to read or write ``.pt`` files.
"""

import re
from typing import Any

import jax
import ml_collections
import numpy as np

from vqgan_jax import workdir as workdir_lib
from vqgan_jax.interop import taming
from vqgan_jax.interop.taming import ConversionError, StateDictReader, TensorMap
from vqgan_jax.models import registry

ENTRY = "model"                        # the state dict's entry in their checkpoint files
STEP_ENTRY = "steps"
CODEBOOK_USED = "quantize.codebook_used"
CODEBOOK_USED_SIZE = 65536             # their VectorQuantizer's usage buffer (show_usage=True)
NORM_GROUPS = 32                       # their Normalize(): GroupNorm(32, C, eps=1e-6)

_SAME = frozenset({"encoder", "decoder", "conv_in", "conv_out", "norm_out", "quant_conv",
                   "post_quant_conv", "mid", "norm1", "conv1", "norm2", "conv2", "nin_shortcut",
                   "norm", "q", "k", "v", "proj_out", "conv"})
_MID = {"block_1": "0", "attn_1": "1", "block_2": "2"}
_BLOCK_LISTS = {"block": "res", "attn": "attn"}


def llamagen_module_path(names: tuple[str, ...], n_levels: int) -> str:
    """Our module path (flax names, e.g. ``("decoder", "up_1_block_0", "conv1")``) -> LlamaGen's
    dotted module path (``decoder.conv_blocks.{n_levels - 2}.res.0.conv1``); see the module
    docstring's table.

    Raises:
      ConversionError: for a module LlamaGen's VQModel does not have.
    """
    parts = []
    for depth, name in enumerate(names):
        if m := re.fullmatch(r"down_(\d+)_(block|attn)_(\d+)", name):
            parts.append(f"conv_blocks.{m[1]}.{_BLOCK_LISTS[m[2]]}.{m[3]}")
        elif m := re.fullmatch(r"down_(\d+)_downsample", name):
            parts.append(f"conv_blocks.{m[1]}.downsample")
        elif m := re.fullmatch(r"up_(\d+)_(block|attn)_(\d+)", name):
            parts.append(f"conv_blocks.{n_levels - 1 - int(m[1])}.{_BLOCK_LISTS[m[2]]}.{m[3]}")
        elif m := re.fullmatch(r"up_(\d+)_upsample", name):
            parts.append(f"conv_blocks.{n_levels - 1 - int(m[1])}.upsample")
        elif depth > 0 and names[depth - 1] == "mid" and name in _MID:
            parts.append(_MID[name])
        elif name in _SAME:
            parts.append(name)
        else:
            raise ConversionError(f"Our parameter path {'/'.join(names)} has no counterpart in "
                                  "LlamaGen's VQModel.")
    return ".".join(parts)


def tensor_maps(g_params: Any, n_levels: int) -> list[TensorMap]:
    """The LlamaGen key, our path and shape of every tensor of a conv VQGAN's ``g_params``
    (arrays or ShapeDtypeStructs) with ``n_levels = len(config.model.ch_mult)``."""
    return taming._tensor_maps(g_params, "g_params", "",
                               lambda names: llamagen_module_path(names, n_levels))


# ----------------------------------------------------------------------------- configs

def check_config(config: ml_collections.ConfigDict, field: str = "--config",
                 source: str = "The config") -> None:
    """Raise ConversionError, naming the field and the fix, unless ``config`` describes a model
    that LlamaGen's VQModel computes: the conv VQGAN, plain VQ with l2-normalized codes,
    GroupNorm(32), attention at the lowest resolution only. ``field`` spells the config in the
    message (``--config`` for a flag), ``source`` says whose config it is."""
    m = config.model
    f = 2 ** (len(m.ch_mult) - 1)
    problems = []
    if config.arch != "vqgan":
        problems.append(f"{field}.arch={config.arch!r} (LlamaGen's VQModel is the conv VQGAN: "
                        "'vqgan')")
    kind = config.get("quantizer", {}).get("kind", "vq")
    if kind != "vq":
        problems.append(f"{field}.quantizer.kind={kind!r} (use 'vq')")
    if not m.get("l2_normalize_codes", False):
        problems.append(f"{field}.model.l2_normalize_codes=False (LlamaGen's codes are "
                        "l2-normalized: set True)")
    if m.norm_groups != NORM_GROUPS:
        problems.append(f"{field}.model.norm_groups={m.norm_groups} (LlamaGen's GroupNorm has "
                        f"{NORM_GROUPS} groups)")
    if tuple(m.attn_resolutions) != (config.image_size // f,):
        problems.append(f"{field}.model.attn_resolutions={tuple(m.attn_resolutions)} (LlamaGen "
                        f"attends at the lowest resolution only: with image_size "
                        f"{config.image_size} and f={f}, set ({config.image_size // f},))")
    if problems:
        raise ConversionError(f"{source} does not describe a LlamaGen VQModel: "
                              + "; ".join(problems) + ".")


def config_from_state_dict(state_dict: dict[str, np.ndarray], source: str,
                           base: ml_collections.ConfigDict | None = None
                           ) -> ml_collections.ConfigDict:
    """``base`` (default :func:`vqgan_jax.config_base.llamagen_vq16_config`) with the model
    layout read off a LlamaGen state dict: ``ch`` (``encoder.conv_in``), ``ch_mult`` (each
    level's first ResnetBlock), ``num_res_blocks``, ``z_channels`` (``encoder.conv_out``),
    ``n_embed`` and ``embed_dim`` (the codebook), attention at the lowest resolution. So VQ-16,
    VQ-8 (ch_mult (1, 2, 2, 4)) and other codebook sizes load without a config.

    Raises:
      ConversionError: naming the key the layout cannot be read without.
    """
    from vqgan_jax.config_base import llamagen_vq16_config

    def get(key):
        if key not in state_dict:
            raise ConversionError(f"{source} has no tensor {key!r}; is this a LlamaGen VQModel "
                                  "state dict? (pass --config to describe another model)")
        return state_dict[key]

    levels = {int(m[1]) for k in state_dict if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))}
    blocks = {int(m[1]) for k in state_dict
              if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    if not levels or not blocks:
        get("encoder.conv_blocks.0.res.0.conv1.weight")
    ch = get("encoder.conv_in.weight").shape[0]
    n_embed, embed_dim = get("quantize.embedding.weight").shape
    config = ml_collections.ConfigDict((base or llamagen_vq16_config()).to_dict())
    n = max(levels) + 1
    config.model.update(
        ch=int(ch),
        ch_mult=tuple(int(get(f"encoder.conv_blocks.{i}.res.0.conv1.weight").shape[0] // ch)
                      for i in range(n)),
        num_res_blocks=max(blocks) + 1, z_channels=int(get("encoder.conv_out.weight").shape[0]),
        n_embed=int(n_embed), embed_dim=int(embed_dim),
        attn_resolutions=(config.image_size // 2 ** (n - 1),))
    return config


# ----------------------------------------------------------------------------- both ways

def tokenizer_from_state_dict(reader: StateDictReader, config: ml_collections.ConfigDict
                              ) -> dict[str, Any]:
    """Take a LlamaGen VQModel's tensors out of ``reader`` as our ``g_params`` (float32 numpy,
    our layouts) and check that no key is left over.

    Raises:
      ConversionError: naming a missing, misshapen or unknown key, or a config field that
        LlamaGen's model does not have (:func:`check_config`).
    """
    check_config(config)
    vq, disc = registry.build_models(config)
    g, _, _ = taming.abstract_tokenizer(vq, disc, config.image_size)
    hint = "check that --config describes this model (config.model fields)"
    g_params: dict[str, Any] = {}
    for m in tensor_maps(g, len(config.model.ch_mult)):
        value = reader.take(m.key, m.torch_shape, hint)
        taming._set(g_params, m.path[1:], m.to_flax(value).astype(np.float32))
    if CODEBOOK_USED in reader.state_dict:
        reader.skip(CODEBOOK_USED)
    reader.check_all_used(hint=hint)
    return g_params


def llamagen_state_dict(config: ml_collections.ConfigDict, g_params: Any
                        ) -> dict[str, np.ndarray]:
    """Our conv VQGAN's parameters -> the state dict of LlamaGen's ``VQModel`` (numpy, their
    layouts), which ``VQModel.load_state_dict(..., strict=True)`` loads: every tensor of
    ``g_params`` under its LlamaGen key, plus ``quantize.codebook_used`` (zeros[65536]), the
    usage buffer their quantizer registers.

    Their ``VQ_16`` / ``VQ_8`` constructors build ``ch=128, num_res_blocks=2``; a model of other
    widths loads into their ``Encoder`` / ``Decoder`` built with those arguments.

    Raises:
      ConversionError: when ``config`` describes a model LlamaGen's does not compute
        (:func:`check_config`).
    """
    check_config(config, field="config")
    out = {}
    for m in tensor_maps(g_params, len(config.model.ch_mult)):
        leaf = g_params
        for name in m.path[1:]:
            leaf = leaf[name]
        out[m.key] = m.to_torch(np.asarray(jax.device_get(leaf), np.float32))
    out[CODEBOOK_USED] = np.zeros((CODEBOOK_USED_SIZE,), np.float32)
    return out


def load_checkpoint(path: str, trust_pickle: bool = False
                    ) -> tuple[dict[str, np.ndarray], int | None]:
    """A LlamaGen ``.pt`` (``{"model": state_dict, "steps": ...}`` or a bare state dict) as
    ``(state_dict, steps)`` (see :func:`vqgan_jax.interop.taming.load_state_dict`)."""
    return taming.load_state_dict(path, trust_pickle, entry=ENTRY, step_entry=STEP_ENTRY,
                                  project="LlamaGen")


def tokenizer_from_llamagen(path: str, config: ml_collections.ConfigDict | None = None, *,
                            trust_pickle: bool = False
                            ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Read a LlamaGen VQModel checkpoint in memory.

    Args:
      path: their ``.pt`` (e.g. ``vq_ds16_c2i.pt``).
      config: a stage-1 config describing the model (e.g. ``configs/llamagen_vq16.py``);
        None: :func:`config_from_state_dict` reads the layout off the file.
      trust_pickle: unpickle the whole file (training checkpoints keep their argparse
        ``args`` as an object); only for a file you trust.

    Returns:
      ``(config, g_params)``: the config used and the parameters of
      :class:`vqgan_jax.models.vqgan.VQModel` (float32 numpy arrays), ready for
      ``registry.build_models(config)[0].apply({"params": g_params}, ...)``.

    Raises:
      ConversionError: naming a missing, misshapen or unknown key, or the config field at
        fault.
    """
    state_dict, _ = load_checkpoint(path, trust_pickle)
    if config is None:
        config = config_from_state_dict(state_dict, path)
    return config, tokenizer_from_state_dict(StateDictReader(state_dict, path), config)


def convert_from_llamagen(path: str, out: str, config: ml_collections.ConfigDict | None = None,
                          *, step: int | None = None, trust_pickle: bool = False) -> str:
    """A LlamaGen VQModel checkpoint -> a stage-1 workdir ``out`` (``python -m
    vqgan_jax.convert --from_llamagen``): the converted generator, a fresh discriminator and
    fresh optimizer states at ``step`` (default: the file's ``steps``, else 0).

    Returns:
      ``out`` as an absolute path.
    """
    state_dict, file_step = load_checkpoint(path, trust_pickle)
    if config is None:
        config = config_from_state_dict(state_dict, path)
    g_params = tokenizer_from_state_dict(StateDictReader(state_dict, path), config)
    step = step if step is not None else (file_step or 0)
    return taming.write_tokenizer_workdir(
        out, config, {"g_params": g_params, "d_params": None, "d_batch_stats": None}, step)


def convert_to_llamagen(workdir: str, path: str) -> dict[str, np.ndarray]:
    """A stage-1 workdir's latest checkpoint -> ``{"model": state_dict}`` at ``path``
    (torch.save), which LlamaGen loads as ``vq_model.load_state_dict(torch.load(path)["model"])``
    (see :func:`llamagen_state_dict`).

    Returns:
      The state dict written (numpy arrays).

    Raises:
      ConversionError: naming the workdir config's field LlamaGen's model lacks; ValueError
        naming --workdir.
    """
    config = workdir_lib.read_config(workdir_lib.absolute(workdir), "--workdir")
    if config.stage != "tokenizer":
        raise ConversionError(f"--workdir={workdir!r} holds a {config.stage!r} run; "
                              "--to_llamagen exports a stage-1 (tokenizer) workdir.")
    check_config(config, field="config", source=f"--workdir={workdir!r}: its config")
    saved = taming.read_tokenizer_workdir(workdir)
    state_dict = llamagen_state_dict(config, saved["g_params"])
    taming.save_state_dict(path, state_dict, entry=ENTRY)
    return state_dict
