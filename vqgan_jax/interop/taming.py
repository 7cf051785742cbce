"""taming-transformers checkpoints <-> vqgan_jax parameters and workdirs (Esser et al. 2021).

Two kinds of taming checkpoint are read: a ``VQModel`` (stage 1: encoder, decoder, quantize,
quant_conv, post_quant_conv and, when present, loss.discriminator) and a
``Net2NetTransformer`` (stage 2: ``transformer.*``, a minGPT, and ``first_stage_model.*``, a
VQModel). The other way, a stage-1 workdir becomes a state dict that taming's ``VQModel``
loads with ``strict=True``.

Every tensor is mapped one to one:

* conv kernels: taming OIHW ``[out, in, kh, kw]`` <-> flax HWIO ``[kh, kw, in, out]``;
* linear weights: taming ``[out, in]`` <-> flax kernels ``[in, out]``;
* GroupNorm / LayerNorm / BatchNorm ``weight`` <-> ``scale``, ``bias`` <-> ``bias``;
  BatchNorm ``running_mean`` / ``running_var`` <-> ``batch_stats`` ``mean`` / ``var``;
* ``quantize.embedding.weight [n_embed, embed_dim]`` <-> ``quantize/codebook`` (same layout);
* names: taming's ``down.i.block.j`` / ``down.i.attn.j`` / ``down.i.downsample`` (and ``up.*``)
  are our modules ``down_i_block_j`` / ``down_i_attn_j`` / ``down_i_downsample``; the
  discriminator's ``main.i`` is ``main_i`` (see :mod:`vqgan_jax.models.vqgan` and
  :mod:`vqgan_jax.models.discriminators`).

Not kept: BatchNorm ``num_batches_tracked`` (BatchNorm2d with a momentum never reads it; the
export writes the workdir's step there) and taming's LPIPS network ``loss.perceptual_loss.*``
(known and skipped: vqgan_jax ships its own LPIPS weights). Any other key that the model
described by the config does not have, a missing key or a misshapen tensor raises
:class:`ConversionError` naming the key.

minGPT -> our GPT (:mod:`vqgan_jax.models.gpt`), mapped explicitly where the layouts differ:

* ``blocks.N.attn.query/key/value`` (three ``[C, C]`` linears) -> one fused ``h_N/attn/c_attn``
  kernel ``[C, 3C] = [Wq^T | Wk^T | Wv^T]`` and bias ``[bq | bk | bv]`` (heads are contiguous
  ``head_dim`` slices in both); ``attn.proj`` -> ``c_proj``; ``ln1/ln2`` -> ``ln_1/ln_2``;
  ``mlp.0`` -> ``c_fc``, ``mlp.2`` -> ``mlp_proj``; ``pos_emb [1, T, C]`` -> ``wpe [T, C]``;
  ``ln_f`` -> ``ln_f``; ``head.weight [V', C]`` -> ``head/kernel [C, V]`` (its first V rows).
* Vocabulary: taming shares one table between codes and conditioning tokens (class ``c`` is
  token ``c``; the unconditional start token is ``sos_token``); ours puts conditioning tokens
  after the V codes. ``tok_emb`` rows ``[0, V)`` become our code rows, and the row of each
  conditioning token is copied to ours (class ``c`` -> row ``V + c``). Our null class (for
  classifier-free guidance, which taming lacks) gets the mean of the class rows. Head rows
  beyond the V codes (when taming's vocabulary is larger) predict non-codes and are dropped:
  the code logits are unchanged.
* ``blocks.N.attn.mask`` (minGPT's causal-mask buffer) is checked to be causal and skipped.

torch is imported only to read or write ``.ckpt`` / ``.pt`` files.
"""

import dataclasses
import functools
import pickle
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vqgan_jax import parallel, workdir as workdir_lib
from vqgan_jax.models import registry
from vqgan_jax.state import tokenizer as stage1, transformer as stage2

LPIPS_PREFIX = "loss.perceptual_loss."
DISC_PREFIX = "loss.discriminator."
GPT_PREFIX = "transformer."
FIRST_STAGE_PREFIX = "first_stage_model."


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: the message names the key or flag and the fix."""


# ----------------------------------------------------------------------------- torch files

def import_torch():
    """torch, which only reading or writing PyTorch files needs (it is not a dependency).

    Raises:
      ConversionError: naming the extra to install when torch is missing.
    """
    try:
        import torch
    except ImportError as e:
        raise ConversionError("Reading or writing PyTorch checkpoints needs PyTorch, which is "
                              "not installed: pip install 'vqgan_jax[torch]'.") from e
    return torch


def load_state_dict(path: str, trust_pickle: bool = False, entry: str = "state_dict",
                    step_entry: str = "global_step", project: str = "taming"
                    ) -> tuple[dict[str, np.ndarray], int | None]:
    """Read a taming Lightning ``.ckpt`` (or a ``.pt`` state dict) as numpy arrays.

    Loaded with ``torch.load(weights_only=True)``, which refuses to run code from the file.

    Args:
      path: a file holding ``{entry: {key: tensor}, ...}`` or ``{key: tensor}``.
      trust_pickle: unpickle everything in the file (runs any code it carries). Only for a file
        whose origin you trust that holds Python objects besides tensors (old Lightning files
        keep hyper-parameters as objects).
      entry, step_entry: where the state dict and the step sit in the file (taming/Lightning:
        ``state_dict``, ``global_step``; LlamaGen: ``model``, ``steps``).
      project: whose checkpoint this should be, for the error messages.

    Returns:
      ``(state_dict, step)``: float tensors as float32 arrays (integer buffers keep their
      dtype), and the file's ``step_entry`` (None if absent).

    Raises:
      ConversionError: naming ``--trust_pickle`` when the file holds objects that
        ``weights_only`` loading refuses, or when it holds no state dict.
    """
    torch = import_torch()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} holds Python objects besides tensors, which safe loading refuses ({first}). "
            "Unpickling them runs code from the file: if you trust this file, pass "
            "--trust_pickle (trust_pickle=True) to load this one file.") from e
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    state_dict = checkpoint.get(entry, checkpoint)
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: {entry}[{key!r}] is a {type(value).__name__}, not "
                                  f"a tensor; is this a {project} checkpoint?")
        value = value.detach().cpu()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    step = checkpoint.get(step_entry) if entry in checkpoint else None
    return out, (int(step) if step is not None else None)


def save_state_dict(path: str, state_dict: dict[str, np.ndarray], entry: str = "state_dict"
                    ) -> None:
    """Write ``{entry: {key: torch.Tensor}}`` with ``torch.save`` (``state_dict``: what taming's
    ``VQModel.init_from_ckpt`` and ``load_state_dict(torch.load(path)["state_dict"])`` read;
    LlamaGen reads ``model``)."""
    torch = import_torch()
    # A writable C-contiguous copy where needed: arrays fetched from JAX are read-only, and
    # torch.from_numpy warns about (and would share) a non-writable buffer.
    tensors = {k: torch.from_numpy(np.require(v, requirements=("C", "W")))
               for k, v in state_dict.items()}
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({entry: tensors}, path)


# ----------------------------------------------------------------------------- key bookkeeping

class StateDictReader:
    """Takes tensors out of a state dict by key, checking shapes, and knows what is left over.

    Attributes:
      state_dict: ``{key: np.ndarray}``.
      source: how errors name the file (e.g. its path).
    """
    def __init__(self, state_dict: dict[str, np.ndarray], source: str):
        self.state_dict = state_dict
        self.source = source
        self.used: set[str] = set()

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.state_dict)

    def take(self, key: str, shape: Sequence[int] | None, hint: str = "") -> np.ndarray:
        """The tensor at ``key``, checked to have ``shape`` (None: any shape).

        Raises:
          ConversionError: naming the key when it is missing or has another shape.
        """
        if key not in self.state_dict:
            raise ConversionError(f"{self.source} has no tensor {key!r}, which the model needs"
                                  f"{'; ' + hint if hint else ''}.")
        value = self.state_dict[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{self.source}: {key!r} has shape {tuple(value.shape)} but the "
                                  f"model needs {tuple(shape)}{'; ' + hint if hint else ''}.")
        self.used.add(key)
        return value

    def skip(self, key: str) -> None:
        """Mark ``key`` as known and deliberately not converted."""
        self.used.add(key)

    def check_all_used(self, skipped_prefixes: Sequence[str] = (), hint: str = "") -> None:
        """Raises ConversionError naming every key neither taken nor known."""
        unknown = sorted(k for k in self.state_dict if k not in self.used
                         and not any(k.startswith(p) for p in skipped_prefixes))
        if unknown:
            listed = ", ".join(repr(k) for k in unknown[:8])
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ConversionError(f"{self.source} has {len(unknown)} unknown key(s): {listed}{more}; "
                                  f"they are not part of the model{'; ' + hint if hint else ''}.")


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _module_key(name: str) -> str:
    """One of our module names -> taming's dotted module path."""
    if m := re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", name):
        return f"{m[1]}.{m[2]}.{m[3]}.{m[4]}"
    if m := re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", name):
        return f"{m[1]}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"main_(\d+)", name):
        return f"main.{m[1]}"
    return name


_LEAF_KEYS = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One tensor: taming's ``key`` <-> ``path`` in our tree, of our ``shape``.

    ``conv``: a 4-D conv kernel, HWIO here and OIHW in taming.
    """
    key: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    conv: bool

    @property
    def torch_shape(self) -> tuple[int, ...]:
        s = self.shape
        return (s[3], s[2], s[0], s[1]) if self.conv else s

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0)) if self.conv else np.asarray(w)

    def to_torch(self, k: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(k.transpose(3, 2, 0, 1)) if self.conv else np.asarray(k)


def _taming_module_path(names: tuple[str, ...]) -> str:
    return ".".join(_module_key(n) for n in names)


def _tensor_maps(tree: Any, root: str, prefix: str,
                 module_path: Callable[[tuple[str, ...]], str] = _taming_module_path
                 ) -> list[TensorMap]:
    """A TensorMap per leaf of ``tree``; ``module_path`` turns our module names (the leaf's path
    without its last name) into the other project's dotted module path."""
    maps = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(p.key for p in path)
        if names == ("quantize", "codebook"):
            key = "quantize.embedding.weight"
        else:
            key = module_path(names[:-1]) + "." + _LEAF_KEYS[names[-1]]
        maps.append(TensorMap(prefix + key, (root, *names), tuple(leaf.shape),
                              conv=names[-1] == "kernel" and len(leaf.shape) == 4))
    return maps


def tokenizer_tensor_maps(g_params: Any, d_params: Any = None, d_batch_stats: Any = None,
                          prefix: str = "") -> list[TensorMap]:
    """The taming key of every tensor of a tokenizer (and its discriminator).

    Args:
      g_params: VQModel params (arrays or ShapeDtypeStructs); roots ``g_params``.
      d_params, d_batch_stats: NLayerDiscriminator variables, or None for no discriminator.
      prefix: prepended to every taming key (``first_stage_model.`` inside a Net2Net file).
    """
    maps = _tensor_maps(g_params, "g_params", prefix)
    if d_params is not None:
        maps += _tensor_maps(d_params, "d_params", prefix + DISC_PREFIX)
        maps += _tensor_maps(d_batch_stats, "d_batch_stats", prefix + DISC_PREFIX)
    return maps


def _batchnorm_counters(d_batch_stats: Any, prefix: str) -> list[str]:
    return [f"{prefix}{DISC_PREFIX}{_module_key(name)}.num_batches_tracked"
            for name in d_batch_stats]


# ----------------------------------------------------------------------------- stage 1

def abstract_tokenizer(vq, disc, image_size: int) -> tuple[Any, Any, Any]:
    """ShapeDtypeStructs of ``(g_params, d_params, d_batch_stats)``: no parameters are made."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    g = jax.eval_shape(lambda: nn.meta.unbox(vq.init(jax.random.key(0), x)["params"]))
    d = jax.eval_shape(lambda: nn.meta.unbox(disc.init(jax.random.key(0), x, train=False)))
    return g, d["params"], d["batch_stats"]


def tokenizer_from_state_dict(reader: StateDictReader, vq, disc, image_size: int,
                              prefix: str = "") -> dict[str, Any]:
    """Take a taming VQModel's tensors out of ``reader``.

    Args:
      reader: over the file's state dict; the keys taken (and the skipped LPIPS and
        ``num_batches_tracked`` keys) are marked used.
      vq, disc: the VQModel and NLayerDiscriminator the config describes.
      image_size: the config's image_size (only decides the shapes' attention placement).
      prefix: ``""`` for a VQModel file, ``first_stage_model.`` inside a Net2Net file.

    Returns:
      ``{"g_params": ..., "d_params": ..., "d_batch_stats": ...}`` of float32 numpy arrays in
      our layouts; the two discriminator entries are None when the file has no
      ``loss.discriminator.*``.

    Raises:
      ConversionError: naming a missing or misshapen key.
    """
    g, d, bs = abstract_tokenizer(vq, disc, image_size)
    with_disc = reader.has_prefix(prefix + DISC_PREFIX)
    maps = tokenizer_tensor_maps(g, d if with_disc else None, bs if with_disc else None, prefix)
    hint = "check that --config describes this model (config.model / config.disc fields)"
    out: dict[str, Any] = {"g_params": {}, "d_params": None, "d_batch_stats": None}
    if with_disc:
        out.update(d_params={}, d_batch_stats={})
        for key in _batchnorm_counters(bs, prefix):
            if key in reader.state_dict:
                reader.skip(key)
    for m in maps:
        value = reader.take(m.key, m.torch_shape, hint)
        _set(out[m.path[0]], m.path[1:], m.to_flax(value).astype(np.float32))
    for key in reader.state_dict:
        if key.startswith(prefix + LPIPS_PREFIX):
            reader.skip(key)
    return out


def tokenizer_to_state_dict(g_params: Any, d_params: Any = None, d_batch_stats: Any = None,
                            step: int = 0, lpips: bool = True) -> dict[str, np.ndarray]:
    """Our tokenizer parameters -> taming VQModel's state dict (numpy, torch layouts).

    With the discriminator given, the keys are exactly those of taming's ``VQModel`` with the
    ``VQLPIPSWithDiscriminator`` loss: ``loss.discriminator.*`` (BatchNorm
    ``num_batches_tracked`` = ``step``, int64) and, when ``lpips``, ``loss.perceptual_loss.*``
    (:func:`lpips_state_dict`). Without it, those of a ``VQModel`` whose loss is ``DummyLoss``.
    Either loads with ``strict=True``.

    Returns:
      ``{key: array}``: float32 (conv weights OIHW, codebook ``[n_embed, embed_dim]``).
    """
    maps = tokenizer_tensor_maps(g_params, d_params, d_batch_stats)
    trees = {"g_params": g_params, "d_params": d_params, "d_batch_stats": d_batch_stats}
    out = {}
    for m in maps:
        leaf = functools.reduce(lambda t, k: t[k], m.path[1:], trees[m.path[0]])
        out[m.key] = m.to_torch(np.asarray(jax.device_get(leaf), np.float32))
    if d_batch_stats is not None:
        for key in _batchnorm_counters(d_batch_stats, ""):
            out[key] = np.asarray(step, np.int64)
        if lpips:
            out.update(lpips_state_dict())
    return out


# torchvision VGG16 ``features`` indices of the 13 convs, and where LPIPS' slice1..5 begin.
_VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_SLICE_STARTS = (0, 4, 9, 16, 23)


def lpips_state_dict(prefix: str = LPIPS_PREFIX) -> dict[str, np.ndarray]:
    """The pretrained LPIPS-VGG16 that vqgan_jax ships, in taming's ``LPIPS`` keys and layouts.

    ``scaling_layer.shift/scale [1, 3, 1, 1]``, ``net.slice{s}.{i}.weight/bias`` (OIHW, i the
    torchvision ``features`` index) and ``lin{k}.model.1.weight [1, C, 1, 1]``: what taming's
    ``VQLPIPSWithDiscriminator`` holds under ``loss.perceptual_loss``.
    """
    from vqgan_jax.models import lpips

    params = lpips.load_lpips_params()
    out = {prefix + "scaling_layer.shift": np.asarray(lpips._SHIFT, np.float32).reshape(1, 3, 1, 1),
           prefix + "scaling_layer.scale": np.asarray(lpips._SCALE, np.float32).reshape(1, 3, 1, 1)}
    for k, index in enumerate(_VGG_CONV_INDICES):
        s = sum(index >= start for start in _VGG_SLICE_STARTS)
        conv = params["VGG16_0"][f"Conv_{k}"]
        out[f"{prefix}net.slice{s}.{index}.weight"] = np.ascontiguousarray(
            np.asarray(conv["kernel"], np.float32).transpose(3, 2, 0, 1))
        out[f"{prefix}net.slice{s}.{index}.bias"] = np.asarray(conv["bias"], np.float32)
    for k in range(len(_VGG_SLICE_STARTS)):
        kernel = np.asarray(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], np.float32)
        out[f"{prefix}lin{k}.model.1.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    return out


# ----------------------------------------------------------------------------- stage 2

def gpt_from_state_dict(reader: StateDictReader, gpt, cond_tokens: Sequence[int | None],
                        prefix: str = GPT_PREFIX) -> dict[str, Any]:
    """Take a taming (minGPT) transformer's tensors out of ``reader`` as our GPT's params.

    Args:
      reader: over the Net2Net state dict.
      gpt: our :class:`vqgan_jax.models.gpt.GPT` (vocab_size V = the tokenizer's n_embed,
        n_cond_tokens, block_size, n_layer, n_head, n_embd as the config gives).
      cond_tokens: for each of our conditioning tokens ``V + i``, the taming token whose
        embedding row it takes (class ``c`` -> ``c``; start token -> ``sos_token``), or None
        for the mean of the class rows (the null class).
      prefix: the transformer's key prefix.

    Returns:
      float32 numpy params shaped as ``gpt.init`` makes them.

    Raises:
      ConversionError: naming a missing or misshapen key, a vocabulary too small for the
        codes or the conditioning tokens, or a non-causal attention mask (``n_unmasked > 0``).
    """
    c, v, t, n = gpt.n_embd, gpt.vocab_size, gpt.block_size, gpt.n_layer
    hint = "check that --config describes this transformer (config.model fields)"
    tok = reader.take(prefix + "tok_emb.weight", None)
    head = reader.take(prefix + "head.weight", None)
    vocab = tok.shape[0]
    for key, value in ((prefix + "tok_emb.weight", tok), (prefix + "head.weight", head)):
        if value.ndim != 2 or value.shape[1] != c or value.shape[0] != vocab:
            raise ConversionError(f"{reader.source}: {key!r} has shape {value.shape}; the model "
                                  f"needs [{vocab}, n_embd={c}]; {hint}.")
    needed = max([v] + [k + 1 for k in cond_tokens if k is not None])
    if vocab < needed:
        raise ConversionError(
            f"{reader.source}: {prefix}tok_emb.weight has {vocab} tokens; the tokenizer's "
            f"{v} codes and the conditioning tokens {list(cond_tokens)} need {needed}; check "
            "--tokenizer_config (config.model.n_embed) and --config (num_classes / --sos_token).")
    known = [k for k in cond_tokens if k is not None]
    cond_rows = [tok[k] if k is not None else tok[known].mean(0) for k in cond_tokens]
    params: dict[str, Any] = {
        "wte": {"embedding": np.concatenate([tok[:v], np.stack(cond_rows)], 0) if cond_rows
                else tok[:v]},
        "wpe": reader.take(prefix + "pos_emb", (1, t, c), hint)[0],
        "ln_f": {"scale": reader.take(prefix + "ln_f.weight", (c,), hint),
                 "bias": reader.take(prefix + "ln_f.bias", (c,), hint)},
        "head": {"kernel": np.ascontiguousarray(head[:v].T)},
    }

    def linear(name, n_in, n_out):
        return (reader.take(f"{name}.weight", (n_out, n_in), hint).T,
                reader.take(f"{name}.bias", (n_out,), hint))

    def norm(name):
        return {"scale": reader.take(f"{name}.weight", (c,), hint),
                "bias": reader.take(f"{name}.bias", (c,), hint)}

    causal = np.tril(np.ones((t, t), np.float32))
    for i in range(n):
        b = f"{prefix}blocks.{i}."
        q, k, val = (linear(b + f"attn.{name}", c, c) for name in ("query", "key", "value"))
        proj_w, proj_b = linear(b + "attn.proj", c, c)
        fc_w, fc_b = linear(b + "mlp.0", c, 4 * c)
        out_w, out_b = linear(b + "mlp.2", 4 * c, c)
        if b + "attn.mask" in reader.state_dict:
            mask = reader.take(b + "attn.mask", (1, 1, t, t), hint)
            if not np.array_equal(mask[0, 0] != 0, causal != 0):
                raise ConversionError(f"{reader.source}: {b}attn.mask is not causal (a minGPT with "
                                      "n_unmasked > 0); our GPT attends causally only.")
        params[f"h_{i}"] = {
            "ln_1": norm(b + "ln1"), "ln_2": norm(b + "ln2"),
            "attn": {"c_attn": {"kernel": np.concatenate([q[0], k[0], val[0]], 1),
                                "bias": np.concatenate([q[1], k[1], val[1]], 0)},
                     "c_proj": {"kernel": proj_w, "bias": proj_b}},
            "c_fc": {"kernel": fc_w, "bias": fc_b},
            "mlp_proj": {"kernel": out_w, "bias": out_b}}
    params = jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), params)
    # Every leaf must be where and as large as our GPT has it.
    abstract = jax.eval_shape(lambda: nn.meta.unbox(gpt.init(
        jax.random.key(0), jnp.zeros((1, t), jnp.int32))["params"]))
    got = jax.tree.map(lambda x: x.shape, params)
    want = jax.tree.map(lambda x: tuple(x.shape), abstract)
    if got != want:
        raise ConversionError(f"The converted GPT's parameters {got} differ from the model's "
                              f"{want}; {hint}.")
    return params


# ----------------------------------------------------------------------------- workdirs

def write_tokenizer_workdir(out: str, config: ml_collections.ConfigDict, converted: dict[str, Any],
                            step: int, field: str = "--out") -> str:
    """Write a stage-1 workdir: ``out/checkpoints/<step>`` with the items ``state`` (the state
    a training run of ``config`` starts from, :func:`vqgan_jax.state.tokenizer.init_state`,
    holding the converted parameters: fresh Adam states, a discriminator fresh from
    ``config.seed`` when ``converted`` has none, the generator EMA and LeCAM anchors exactly
    when ``config.loss`` asks for them) and ``config`` (JSON). There is no ``data`` item:
    resuming starts the data iterator afresh.

    Returns:
      ``out`` as an absolute path.

    Raises:
      ValueError: naming the config field that cannot work, or ``field`` when ``out`` already
        holds checkpoints.
    """
    stage1.validate_config(config, num_devices=1)
    out = workdir_lib.ensure_writable_workdir(out)
    sc = stage1.build_step_config(config)
    state = jax.jit(functools.partial(stage1.init_state, sc=sc, image_size=config.image_size))(
        jax.random.key(config.seed))
    g_params = jax.tree.map(jnp.asarray, converted["g_params"])
    if converted["d_params"] is None:
        logging.info("No loss.discriminator in the checkpoint: a fresh discriminator is written.")
    else:
        state = state.replace(d_params=jax.tree.map(jnp.asarray, converted["d_params"]),
                              d_batch_stats=jax.tree.map(jnp.asarray, converted["d_batch_stats"]))
    state = state.replace(
        step=jnp.asarray(step, jnp.int32), g_params=g_params, g_opt_state=sc.g_tx.init(g_params),
        d_opt_state=sc.d_tx.init(state.d_params),
        quantizer_stats=stage1.init_quantizer_stats(sc.vq, g_params),
        g_ema_params=None if state.g_ema_params is None else jax.tree.map(jnp.copy, g_params))
    return _save(out, field, step, state, config)


def write_transformer_workdir(out: str, config: ml_collections.ConfigDict, params: Any, step: int,
                              field: str = "--out") -> str:
    """Write a stage-2 workdir (``state``: the transformer TrainState with fresh AdamW states;
    ``config``, whose ``tokenizer_workdir`` must already point at the stage-1 workdir).

    Returns:
      ``out`` as an absolute path.
    """
    stage2.validate_config(config, num_devices=1)
    out = workdir_lib.ensure_writable_workdir(out)
    sc = stage2.build_step_config(config)
    params = jax.tree.map(jnp.asarray, params)
    state = stage2.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                              opt_state=sc.tx.init(params))
    return _save(out, field, step, state, config)


def _save(out: str, field: str, step: int, state: Any, config: ml_collections.ConfigDict) -> str:
    try:
        workdir_lib.write_state(out, field, step, state, config)
    except workdir_lib.WorkdirNotEmpty as e:
        raise ConversionError(str(e)) from None
    return out


def read_tokenizer_workdir(workdir: str, field: str = "--workdir") -> dict[str, Any]:
    """The latest ``g_params``, ``d_params``, ``d_batch_stats`` and ``step`` of a stage-1 workdir
    (its newest intact checkpoint).

    Raises:
      ValueError: naming ``field`` when ``workdir`` holds no checkpoint or is not stage 1.
      vqgan_jax.workdir.NoIntactCheckpoint: when no checkpoint restores.
    """
    workdir = workdir_lib.absolute(workdir)
    config = workdir_lib.read_config(workdir, field)
    if config.stage != "tokenizer":
        hint = (f" Its tokenizer is {config.tokenizer_workdir!r}."
                if config.get("tokenizer_workdir") else "")
        raise ConversionError(f"{field}={workdir!r} holds a {config.stage!r} run; "
                              f"--to_taming exports a stage-1 (tokenizer) workdir.{hint}")
    vq, disc = registry.build_models(config)
    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    targets = {name: workdir_lib.abstract_like(abstract, parallel.state_shardings(abstract, mesh))
               for name, abstract in zip(("g_params", "d_params", "d_batch_stats"),
                                         abstract_tokenizer(vq, disc, config.image_size))}
    step, out = workdir_lib.restore_subtrees(workdir, field, targets)  # all from one intact step
    return {"step": step, **out}


# ----------------------------------------------------------------------------- the two jobs

def convert_from_taming(path: str, config: ml_collections.ConfigDict, out: str, *,
                        tokenizer_config: ml_collections.ConfigDict | None = None,
                        tokenizer_out: str | None = None, step: int | None = None,
                        sos_token: int = 0, trust_pickle: bool = False) -> dict[str, str]:
    """A taming checkpoint -> vqgan_jax workdir(s) (``python -m vqgan_jax.convert --from_taming``).

    A VQModel file (``config.stage == "tokenizer"``) becomes the stage-1 workdir ``out``. A
    Net2NetTransformer file (``config.stage == "transformer"``, keys ``transformer.*`` and
    ``first_stage_model.*``) becomes the stage-2 workdir ``out`` and the stage-1 workdir
    ``tokenizer_out`` (default ``out/tokenizer``) that its config points to; its first stage is
    described by ``tokenizer_config``. Class-conditional (``cond_stage_model`` a Labelator) and
    unconditional (an SOSProvider with ``sos_token``) models convert; image-conditional ones
    (a VQModel as cond stage) do not.

    Args:
      step: the step the checkpoints are written at (default: the file's ``global_step``, else 0).

    Returns:
      ``{"tokenizer": stage-1 workdir[, "transformer": stage-2 workdir]}`` (absolute paths).

    Raises:
      ConversionError / ValueError: naming the key or flag at fault.
    """
    state_dict, file_step = load_state_dict(path, trust_pickle)
    reader = StateDictReader(state_dict, path)
    step = step if step is not None else (file_step or 0)
    is_net2net = reader.has_prefix(GPT_PREFIX)
    if not is_net2net:
        converted = _vqmodel_from_reader(reader, path, config)
        return {"tokenizer": write_tokenizer_workdir(out, config, converted, step)}

    if config.stage != "transformer":
        raise ConversionError(f"{path} is a taming Net2NetTransformer; pass a stage-2 --config "
                              f"(config.stage is {config.stage!r}) and --tokenizer_config.")
    if tokenizer_config is None:
        raise ConversionError(f"{path} is a taming Net2NetTransformer: pass --tokenizer_config, "
                              "the stage-1 recipe of its first_stage_model (e.g. "
                              "configs/imagenet_f16_16384.py).")
    if reader.has_prefix("cond_stage_model."):
        raise ConversionError(f"{path} has cond_stage_model.* tensors (an image-conditional "
                              "model); only class-conditional and unconditional Net2Net "
                              "checkpoints convert.")
    if config.conditioning == "class":
        cond_tokens = list(range(config.num_classes)) + [None]
    elif config.conditioning == "unconditional":
        cond_tokens = [sos_token]
    else:
        raise ConversionError(f"--config has conditioning={config.conditioning!r}; taming "
                              "checkpoints convert as 'class' or 'unconditional'.")
    vq, disc = registry.build_models(tokenizer_config)
    converted = tokenizer_from_state_dict(reader, vq, disc, tokenizer_config.image_size,
                                          prefix=FIRST_STAGE_PREFIX)
    tokenizer_out = workdir_lib.absolute(tokenizer_out or str(epath.Path(out) / "tokenizer"))
    config = ml_collections.ConfigDict(config.to_dict())
    config.tokenizer_workdir = tokenizer_out
    gpt, _ = registry.build_transformer(config, vq)
    params = gpt_from_state_dict(reader, gpt, cond_tokens)
    reader.check_all_used(hint="check that --config (config.model) and --tokenizer_config "
                          "describe this model")
    written = {"tokenizer": write_tokenizer_workdir(tokenizer_out, tokenizer_config, converted,
                                                    step, field="--tokenizer_out")}
    written["transformer"] = write_transformer_workdir(out, config, params, step)
    return written


def _vqmodel_from_reader(reader: StateDictReader, path: str, config: ml_collections.ConfigDict
                         ) -> dict[str, Any]:
    if reader.has_prefix(GPT_PREFIX) or config.stage != "tokenizer":
        raise ConversionError(
            f"{path} is a taming {'Net2NetTransformer' if reader.has_prefix(GPT_PREFIX) else 'VQModel'}"
            f" and config.stage is {config.stage!r}: a VQModel file (no transformer.* keys) goes "
            "with a stage-1 config (e.g. configs/imagenet_f16.py).")
    vq, disc = registry.build_models(config)
    converted = tokenizer_from_state_dict(reader, vq, disc, config.image_size)
    reader.check_all_used(hint="check that --config describes this model (config.model / "
                          "config.disc); Gumbel or EMA quantizers do not convert")
    return converted


def read_taming_tokenizer(path: str, config: ml_collections.ConfigDict,
                          trust_pickle: bool = False) -> Any:
    """A taming VQModel ``.ckpt`` as our tokenizer parameters, in memory (no workdir written).

    Args:
      path: the file; config: the stage-1 recipe describing its model.

    Returns:
      ``g_params``: float32 numpy arrays in the layout of ``build_models(config)[0]``.

    Raises:
      ConversionError: for a missing torch, a Net2NetTransformer file or a stage-2 config, and
        a missing, misshapen or unknown key (named).
    """
    reader = StateDictReader(load_state_dict(path, trust_pickle)[0], path)
    return _vqmodel_from_reader(reader, path, config)["g_params"]


TAMING_LOSSES = ("vqlpips", "dummy")


def convert_to_taming(workdir: str, path: str, taming_loss: str = "vqlpips") -> dict[str, np.ndarray]:
    """A stage-1 workdir's latest checkpoint -> ``{"state_dict": ...}`` at ``path`` (torch.save)
    that taming's VQModel loads with ``strict=True`` (see :func:`tokenizer_to_state_dict`).

    Args:
      taming_loss: the ``lossconfig`` of the VQModel that will load the file:
        ``vqlpips`` (``VQLPIPSWithDiscriminator``: discriminator and LPIPS included) or
        ``dummy`` (``DummyLoss``: no ``loss.*`` keys; what inference configs use).

    Returns:
      The state dict written (numpy arrays).

    Raises:
      ConversionError: naming --taming_loss for another value; ValueError naming --workdir.
    """
    if taming_loss not in TAMING_LOSSES:
        raise ConversionError(f"--taming_loss={taming_loss!r}; use one of {TAMING_LOSSES}.")
    saved = read_tokenizer_workdir(workdir)
    with_loss = taming_loss == "vqlpips"
    state_dict = tokenizer_to_state_dict(
        saved["g_params"], saved["d_params"] if with_loss else None,
        saved["d_batch_stats"] if with_loss else None, step=saved["step"])
    save_state_dict(path, state_dict)
    return state_dict
