"""The public API: a tokenizer or a generator from a workdir (or a checkpoint file), called on
numpy arrays::

    import vqgan_jax
    tok = vqgan_jax.load_tokenizer("runs/demo")    # a stage-1 workdir, or a taming .ckpt
    codes = tok.encode(images)       # uint8[B, H, W, 3] (or float32 in [-1, 1]) -> int32[B, H/f, W/f]
    images = tok.decode(codes)       # int[B, h, w] -> uint8[B, h*f, w*f, 3]
    gen = vqgan_jax.load_generator("runs/demo/transformer")   # or a MaskGIT workdir
    images = gen.sample(class_ids=[0, 1], num=4, top_k=100, top_p=0.95, seed=0)  # uint8

Every call checks its arguments first and raises ``ValueError`` naming the argument and the
fix before anything compiles. The batch is padded to a multiple of the local device count
(copies of its last row) and cut back after; each call is one ``jax.jit`` program, with
``NamedSharding``s over a ``jax.sharding.Mesh`` of all local devices (batch split, parameters
laid out by the workdir's sharding rules), compiled once per input shape and setting and
reused from then on.
"""

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vqgan_jax import metrics, parallel, workdir as workdir_lib
from vqgan_jax.data import pipeline
from vqgan_jax.interop import llamagen, taming
from vqgan_jax.models import registry
from vqgan_jax.samplers import autoregressive, maskgit as maskgit_sampler
from vqgan_jax.samplers.guidance import GuidanceSchedule
from vqgan_jax.state import maskgit as maskgit_state, transformer as stage2

__all__ = ["Generator", "Tokenizer", "load_generator", "load_tokenizer", "pad_batch"]

def _taming_file(path: str, config: ml_collections.ConfigDict | None):
    if config is None:
        raise ValueError(f"path={path!r} is a taming checkpoint: pass config=, the recipe of its "
                         "model (e.g. get_config() of configs/imagenet_f16.py).")
    return config, taming.read_taming_tokenizer(path, config)


# Checkpoint files load_tokenizer reads, by suffix: (path, config or None) -> (config, g_params).
TOKENIZER_FILES: dict[str, Callable[[str, ml_collections.ConfigDict | None], Any]] = {
    ".ckpt": _taming_file,                      # taming-transformers VQModel (Lightning .ckpt)
    ".pt": llamagen.tokenizer_from_llamagen,    # LlamaGen VQModel; config read off the file
}


def pad_batch(x: np.ndarray, multiple: int) -> np.ndarray:
    """``x`` with its leading (batch) axis padded to a multiple of ``multiple`` by copies of its
    last row (valid inputs, so the padded rows compute like the others); cut back with
    ``out[:len(x)]``."""
    extra = -x.shape[0] % multiple
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


class _OnLocalDevices:
    """A mesh over this process's devices and the one way to run a program on it."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.mesh = parallel.create_mesh(devices=jax.local_devices())
        self._rules = parallel.rules_from_config(config)
        self._batch = parallel.batch_sharding(self.mesh)
        self._replicated = parallel.replicated(self.mesh)

    def _run(self, program, args: tuple, batch: np.ndarray, *scalars) -> np.ndarray:
        """``program(*args, padded batch, *scalars)``, the batch split over the devices."""
        n = len(batch)
        x = jax.device_put(pad_batch(batch, self.mesh.devices.size), self._batch)
        with parallel.sharding_context(self.mesh, self._rules):  # activation constraints
            return np.asarray(program(*args, x, *scalars))[:n]


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, tree)


class Tokenizer(_OnLocalDevices):
    """A stage-1 tokenizer (conv VQGAN or ViT-VQGAN) ready to encode and decode.

    Made by :func:`load_tokenizer`. Attributes: ``config`` (its recipe, an ml_collections
    ConfigDict), ``model`` (the flax module), ``params``, ``downsample_factor`` (f: image side /
    code-grid side), ``n_embed`` (codebook size).
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any):
        super().__init__(config)
        self.config = config
        self.model = registry.build_models(config)[0]
        _, shardings = workdir_lib.param_shardings(self.model, self.mesh, self._rules)
        self.params = jax.device_put(params, shardings)
        vq = self.model

        def encode(params, x):
            x = pipeline.to_unit_range(x) if x.dtype == jnp.uint8 else x
            return vq.apply({"params": params}, x, method="encode_to_indices").astype(jnp.int32)

        def decode(params, codes):
            return metrics.to_uint8(vq.apply({"params": params}, codes,
                                             method="decode_from_indices"))

        # jax.jit keeps one executable per input shape and dtype: each shape compiles once.
        self._encode = jax.jit(encode, in_shardings=(shardings, self._batch),
                               out_shardings=self._batch)
        self._decode = jax.jit(decode, in_shardings=(shardings, self._batch),
                               out_shardings=self._batch)

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    @property
    def n_embed(self) -> int:
        return self.model.n_embed

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images -> code grids (the codebook index of each ``f x f`` patch).

        Args:
          images: uint8[B, H, W, 3] in [0, 255], or float32[B, H, W, 3] in [-1, 1]; any batch
            size B >= 1; H and W any positive multiples of ``downsample_factor``.

        Returns:
          int32[B, H/f, W/f] in ``[0, n_embed)``.

        Raises:
          ValueError: naming ``images`` for a wrong rank, channel count, size, dtype or range.
        """
        return self._run(self._encode, (self.params,), self._check_images(images))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Code grids -> images.

        Args:
          codes: integers [B, h, w] in ``[0, n_embed)`` (as :meth:`encode` returns); any B >= 1.

        Returns:
          uint8[B, h*f, w*f, 3] (the decoder's output clipped to [-1, 1] and rounded).

        Raises:
          ValueError: naming ``codes`` for a wrong rank or dtype, or values outside
            ``[0, n_embed)``.
        """
        return self._run(self._decode, (self.params,), self._check_codes(codes))

    def _check_images(self, images: Any) -> np.ndarray:
        x, f = np.asarray(images), self.downsample_factor
        if x.ndim != 4 or x.shape[0] == 0:
            raise ValueError(f"images has shape {x.shape}; pass a batch [B, H, W, 3] with B >= 1 "
                             "(one image: images[None]).")
        if x.shape[-1] != 3:
            raise ValueError(f"images has {x.shape[-1]} channels (shape {x.shape}); pass RGB "
                             "[B, H, W, 3] (PIL: Image.convert('RGB')).")
        h, w = x.shape[1:3]
        if h % f or w % f:
            raise ValueError(
                f"images are {h}x{w} pixels; height and width must be multiples of the "
                f"tokenizer's downsampling factor {f}: crop or resize them, e.g. to "
                f"{max(f, h // f * f)}x{max(f, w // f * f)}.")
        if x.dtype == np.uint8:
            return x
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images has dtype {x.dtype}; pass uint8 in [0, 255] or float32 "
                             "in [-1, 1].")
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (-1.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(
                f"images are floats in [{lo:g}, {hi:g}]; float images must lie in [-1, 1]: map "
                "[0, 1] images with x * 2 - 1, [0, 255] ones with x / 127.5 - 1, or pass uint8.")
        return x.astype(np.float32)

    def _check_codes(self, codes: Any) -> np.ndarray:
        c = np.asarray(codes)
        if c.ndim != 3 or c.shape[0] == 0 or 0 in c.shape:
            raise ValueError(f"codes has shape {c.shape}; pass a batch of code grids [B, h, w] "
                             "with B >= 1, as encode returns (one grid: codes[None]).")
        if not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"codes has dtype {c.dtype}; pass integer codebook indices (int32, "
                             "as encode returns).")
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= self.n_embed:
            raise ValueError(f"codes hold values in [{lo}, {hi}]; this tokenizer has "
                             f"n_embed={self.n_embed} codes, so codes must lie in "
                             f"[0, {self.n_embed}).")
        return c.astype(np.int32)


# Stage-2 kinds load_generator takes (config.stage) -> their loader (load_for_sampling).
GENERATOR_STAGES = {"transformer": stage2.load_for_sampling,
                    "maskgit": maskgit_state.load_for_sampling}


class Generator(_OnLocalDevices):
    """A stage-2 generator over a frozen tokenizer's codes, ready to sample images: a GPT
    (``kind="transformer"``, codes drawn one at a time, Esser et al. 2021) or a MaskGIT
    (``kind="maskgit"``, iterative parallel decoding, Chang et al. 2022).

    Made by :func:`load_generator`. Attributes: ``kind``, ``config`` (its recipe),
    ``tokenizer`` (:class:`Tokenizer` over the same frozen weights: the generator EMA when that
    run kept one), ``conditioning`` (``kind``: unconditional / class / image; ``num_classes``;
    for a MaskGIT only these two fields apply, its tokens are ``MaskGIT.class_tokens``),
    ``image_size`` (the training image side in pixels).
    """

    def __init__(self, path: str, step: int | None = None):
        # The stage-2 config is read here once to pick the loader (which reads it again with
        # the checkpoint it restores); the tokenizer's config once by the loader and once here.
        config = workdir_lib.read_config(workdir_lib.absolute(path), "path", step)
        if config.stage not in GENERATOR_STAGES:
            raise ValueError(
                f"path={path!r} is a stage-1 (tokenizer) workdir; load it with "
                "vqgan_jax.load_tokenizer. load_generator takes a stage-2 (transformer or "
                "maskgit) workdir, e.g. runs/demo/transformer.")
        super().__init__(config)
        self.kind = config.stage
        self.params, frozen, self._sc, self.config = GENERATOR_STAGES[self.kind](
            path, self.mesh, step, field="path")
        self.tokenizer = Tokenizer(workdir_lib.read_config(
            config.tokenizer_workdir, "config.tokenizer_workdir", stage="tokenizer"),
            frozen["tokenizer"])
        self._frozen = frozen
        if self.kind == "maskgit":
            sc = self._sc
            self.conditioning = registry.Conditioning(
                "class" if sc.num_classes else "unconditional", vocab_size=sc.model.vocab_size,
                num_classes=sc.num_classes)
        else:
            self.conditioning = self._sc.conditioning
        self.image_size = config.image_size
        self._programs: dict[tuple, Any] = {}

    def sample(self, class_ids: Sequence[int] | None = None, num: int = 1, top_k: int = 0,
               top_p: float = 1.0, temperature: float = 1.0, guidance_scale: float = 1.0,
               height: int | None = None, width: int | None = None, seed: int = 0, *,
               num_steps: int | None = None, choice_temperature: float | None = None,
               guidance_schedule: str = "constant", guidance_power: float = 1.0,
               guidance_interval: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """Sample images, decoded by the tokenizer. A GPT draws codes one at a time with a KV
        cache (a sliding window beyond the training grid); a MaskGIT fills its training grid in
        ``num_steps`` parallel steps (:mod:`vqgan_jax.samplers.maskgit`).

        Args:
          class_ids: class-conditional models: the classes, ``num`` samples of each, in that
            order; ids in ``[0, conditioning.num_classes)``. Unconditional models: None.
          num: samples per class (unconditional: in all), >= 1.
          top_k: keep the k most likely codes each step; 0 keeps all.
          top_p: nucleus sampling mass, in (0, 1]; 1 keeps all. GPT only.
          temperature: > 0; divides the logits.
          guidance_scale: classifier-free guidance ``u + s (c - u)`` (class models); 1 is off.
          height, width: output size in pixels, multiples of ``tokenizer.downsample_factor``
            and at least ``image_size`` (default ``image_size``); beyond it a GPT predicts each
            code from the training-size window around it. A MaskGIT samples ``image_size`` only.
          seed: the same seed (on the same devices) gives the same images.
          num_steps: MaskGIT only: decoding steps T in ``[1, codes of the grid]`` (default
            ``config.sample.num_steps``).
          choice_temperature: MaskGIT only: the Gumbel noise scale on the confidences, annealed
            to 0 over the steps; >= 0 (default ``config.sample.choice_temperature``).
          guidance_schedule: the guidance scale over the codes (GPT) or steps (MaskGIT):
            "constant" (``guidance_scale`` throughout), "linear" (1 at the start to the scale at
            the end), "power_cosine" (with ``guidance_power`` > 0), "interval" (the scale for
            progress in ``guidance_interval`` = (lo, hi), 1 elsewhere); see
            :class:`vqgan_jax.samplers.guidance.GuidanceSchedule`.

        Returns:
          uint8[len(class_ids) * num (or num), height, width, 3], row-major: class by class.

        Raises:
          ValueError: naming the argument, before anything compiles, for any value above
            outside its range, an argument of the other kind of model (``num_steps`` or
            ``choice_temperature`` given to a GPT; ``top_p`` != 1 or a size other than
            ``image_size`` to a MaskGIT), class ids given to an unconditional model (or none to
            a class model), and image-conditional models (which need condition images).
        """
        class_ids = [] if class_ids is None else [int(c) for c in np.ravel(class_ids)]
        if not isinstance(num, (int, np.integer)) or num < 1:
            raise ValueError(f"num={num!r}; sample at least one image (an int >= 1).")
        if not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 keeps every code).")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 keeps every code).")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0.")
        f, size = self.tokenizer.downsample_factor, self.image_size
        height, width = height or size, width or size
        for name, value in (("height", height), ("width", width)):
            if value % f or value < size:
                raise ValueError(f"{name}={value} pixels; use a multiple of the downsampling "
                                 f"factor {f} of at least the training size {size}.")
        schedule = GuidanceSchedule(guidance_schedule, guidance_scale, guidance_power,
                                    guidance_interval)  # ValueError naming a bad field
        guidance = (schedule.kind, float(schedule.power), schedule.interval)  # hashable
        if self.kind == "maskgit":
            return self._sample_maskgit(class_ids, num, int(top_k), top_p, temperature,
                                        guidance_scale, height, width, seed, num_steps,
                                        choice_temperature, guidance)
        for name, value in (("num_steps", num_steps), ("choice_temperature", choice_temperature)):
            if value is not None:
                raise ValueError(f"{name}={value!r} applies to MaskGIT generators; this one is "
                                 "autoregressive (a GPT): leave it out.")
        autoregressive.check_sampling_args(self._sc, height // f, width // f, guidance_scale,
                                           *guidance)
        prefix = np.asarray(autoregressive.class_rows(self.conditioning, class_ids, num))
        guided = guidance_scale != 1.0
        program = self._program(height // f, width // f, int(top_k), float(top_p), guided,
                                guidance)
        return self._run(program, (self.params, self._frozen), prefix, jax.random.key(seed),
                         jnp.float32(temperature), jnp.float32(guidance_scale))

    def _sample_maskgit(self, class_ids, num, top_k, top_p, temperature, guidance_scale,
                        height, width, seed, num_steps, choice_temperature, guidance):
        s, size = self.config.sample, self.image_size
        if top_p != 1.0:
            raise ValueError(f"top_p={top_p!r} applies to autoregressive (GPT) generators; a "
                             "MaskGIT samples with top_k and temperature: leave top_p out.")
        for name, value in (("height", height), ("width", width)):
            if value != size:
                raise ValueError(f"{name}={value} pixels: MaskGIT samples its training size "
                                 f"{size} only (no sliding window); leave {name} out.")
        num_steps = s.num_steps if num_steps is None else num_steps
        choice_temperature = (s.choice_temperature if choice_temperature is None
                              else choice_temperature)
        f = self.tokenizer.downsample_factor
        maskgit_sampler.check_sampling_args(
            self._sc, height // f, width // f, guidance_scale, *guidance, num_steps=num_steps,
            top_k=top_k, temperature=temperature, choice_temperature=choice_temperature)
        cond = np.asarray(maskgit_sampler.class_rows(self._sc.model, class_ids, num))
        program = self._program_maskgit(int(num_steps), top_k, guidance_scale != 1.0, guidance)
        return self._run(program, (self.params, self._frozen), cond, jax.random.key(seed),
                         jnp.float32(temperature), jnp.float32(choice_temperature),
                         jnp.float32(guidance_scale))

    def _jit(self, program, num_scalars: int):
        rep = self._replicated
        return jax.jit(program, in_shardings=(
            _shardings(self.params), _shardings(self._frozen), self._batch, rep)
            + (rep,) * num_scalars, out_shardings=self._batch)

    def _program(self, height: int, width: int, top_k: int, top_p: float, guided: bool,
                 guidance: tuple = ("constant", 1.0, (0.0, 1.0))):
        """The jitted GPT sampler for one grid and setting (cached: each compiles once; the
        batch size is the only other thing that compiles anew)."""
        key = ("transformer", height, width, top_k, top_p, guided, guidance)
        if key not in self._programs:
            sc = self._sc
            schedule, power, interval = guidance

            def program(params, frozen, prefix, rng, temperature, guidance_scale):
                return metrics.to_uint8(autoregressive.draw_images(
                    params, frozen, sc, prefix, rng, height=height, width=width, top_k=top_k,
                    top_p=top_p, temperature=temperature,
                    guidance_scale=guidance_scale if guided else None,
                    guidance_schedule=schedule, guidance_power=power,
                    guidance_interval=interval))

            self._programs[key] = self._jit(program, 2)
        return self._programs[key]

    def _program_maskgit(self, num_steps: int, top_k: int, guided: bool, guidance: tuple):
        """The jitted MaskGIT sampler for one setting (cached as :meth:`_program`)."""
        key = ("maskgit", num_steps, top_k, guided, guidance)
        if key not in self._programs:
            sc = self._sc
            schedule, power, interval = guidance

            def program(params, frozen, cond, rng, temperature, choice_temperature,
                        guidance_scale):
                return metrics.to_uint8(maskgit_sampler.draw_images(
                    params, frozen, sc, cond, rng, num_steps=num_steps, top_k=top_k,
                    temperature=temperature, choice_temperature=choice_temperature,
                    guidance=GuidanceSchedule(schedule, guidance_scale, power, interval)
                    if guided else None))

            self._programs[key] = self._jit(program, 3)
        return self._programs[key]


def _check_path(path: str, wants: str) -> None:
    if not epath.Path(path).exists():
        raise ValueError(f"path={path!r} does not exist; pass {wants}.")


def load_tokenizer(path: str | os.PathLike, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None) -> Tokenizer:
    """A tokenizer from a stage-1 workdir or a checkpoint file.

    Args:
      path: a stage-1 workdir (the ``--workdir`` of a ``python -m vqgan_jax.main`` run with a
        tokenizer recipe), or a checkpoint file converted in memory (needs torch:
        ``pip install 'vqgan_jax[torch]'``): a taming-transformers VQModel ``.ckpt`` (with
        ``config``) or a LlamaGen VQModel ``.pt`` such as ``vq_ds16_c2i.pt`` (layout read off it).
      step: a workdir's checkpoint step; None: the newest intact one.
      config: with a file only: the recipe describing its model (an ml_collections ConfigDict,
        e.g. ``get_config()`` of configs/imagenet_f16.py); required for a ``.ckpt``.

    Returns:
      A :class:`Tokenizer`: the generator EMA weights when the run kept them, else its weights.

    Raises:
      ValueError: naming ``path`` (missing, no checkpoint, a stage-2 workdir, an unknown file
        type), ``step`` (no such checkpoint) or ``config`` (missing for a file, given for a
        workdir, or not describing the file: ``taming.ConversionError``).
      vqgan_jax.workdir.NoIntactCheckpoint: when no checkpoint of the workdir restores.
    """
    path = os.fspath(path)
    wants = ("a stage-1 workdir (e.g. runs/demo after `make demo`) or a checkpoint file "
             f"({', '.join(sorted(TOKENIZER_FILES))})")
    _check_path(path, wants)
    if os.path.isfile(path):
        suffix = pathlib.Path(path).suffix
        if suffix not in TOKENIZER_FILES:
            raise ValueError(f"path={path!r} is a {suffix or 'suffix-less'} file; pass {wants}.")
        if step is not None:
            raise ValueError(f"step={step} applies to workdirs; {path!r} is a file.")
        return Tokenizer(*TOKENIZER_FILES[suffix](path, config))
    if config is not None:
        raise ValueError(f"config= is for checkpoint files; the workdir {path!r} holds its own "
                         "config: leave config out.")
    workdir = workdir_lib.absolute(path)
    config = workdir_lib.read_config(workdir, "path", step)
    if config.stage != "tokenizer":
        raise ValueError(
            f"path={path!r} is a stage-2 ({config.stage}) workdir; load it with "
            "vqgan_jax.load_generator, or pass its tokenizer workdir "
            f"{config.get('tokenizer_workdir')!r} to load_tokenizer.")
    vq = registry.build_models(config)[0]
    mesh = parallel.create_mesh(devices=jax.local_devices())
    params, _ = workdir_lib.restore_eval_params(workdir, "path", config, vq, mesh,
                                                parallel.rules_from_config(config), step)
    return Tokenizer(config, params)


def load_generator(path: str | os.PathLike, step: int | None = None) -> Generator:
    """A generator from a stage-2 workdir, with its tokenizer.

    Args:
      path: a stage-2 workdir: a GPT's (``config.stage == "transformer"``, e.g.
        runs/demo/transformer after `make demo`) or a MaskGIT's (``"maskgit"``, trained with
        configs/demo_maskgit.py); its config names the stage-1 workdir whose tokenizer decodes
        the samples (the generator EMA weights when that run kept them).
      step: the generator's checkpoint step; None: the newest intact one (the tokenizer: its
        newest).

    Returns:
      A :class:`Generator`.

    Raises:
      ValueError: naming ``path`` (missing, no checkpoint, a stage-1 workdir) or ``step``.
      vqgan_jax.workdir.NoIntactCheckpoint: when no checkpoint restores.
    """
    path = os.fspath(path)
    _check_path(path, "a stage-2 workdir (e.g. runs/demo/transformer after `make demo`)")
    return Generator(path, step)
