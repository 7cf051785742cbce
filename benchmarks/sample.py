"""Speed of the jitted stage-2 samplers: the GPT with the KV cache and without it, and the GPT
(KV cache) against MaskGIT's parallel decoding.

    python benchmarks/sample.py --config=configs/demo_transformer.py --vocab_size=1024 --grid=16

Builds the config's GPT (random weights: speed does not depend on them) over ``--vocab_size``
codes and a ``--grid`` x ``--grid`` code grid, class-conditional prefix, and times
:func:`vqgan_jax.samplers.autoregressive.sample` for each batch size in ``--batch_sizes`` with
``use_cache=True`` (one token a step through the KV cache) and ``use_cache=False`` (the whole
sequence recomputed every step). Each case is compiled first (``compile_s``), then timed over
``--repeats`` calls (the best is kept). ``--variants=cache`` times the cached sampler alone (the
uncached one is far too slow for a large GPT at a large batch); the compute dtype is the
config's (``--config.dtype=bfloat16``).

    python benchmarks/sample.py --config=configs/imagenet_cond_transformer.py \
        --vocab_size=16384 --grid=16 --batch_sizes=32,128 --variants=cache

The last line printed is a JSON object: ``codes_per_s`` per case (``"cache_b32"``, ...),
``seconds`` per case, ``cache_speedup`` per batch size (only when both variants are timed), and
``compile_s``, ``device``, ``num_codes``, ``n_params``.

``--mode=ar_vs_maskgit`` times the GPT with the KV cache
(:func:`vqgan_jax.samplers.autoregressive.sample`, ``--top_k``/``--top_p``) against MaskGIT's
iterative parallel decoding (:func:`vqgan_jax.samplers.maskgit.sample`, Chang et al. 2022,
``--num_steps`` steps, ``top_k``/``choice_temperature`` of the MaskGIT config's ``sample``) on
the same grid and batch, class 0, codes only and, with ``--decode``, codes decoded to images by
the tokenizer in the same jitted program. The two models are either random ones of the sizes
of ``--config`` and ``--maskgit_config`` (over ``--vocab_size`` codes and a ``--grid`` grid;
``--decode`` adds a random tokenizer of ``--tokenizer_config``, whose ``n_embed`` must be
``--vocab_size``), or, with ``--ar_workdir`` and ``--maskgit_workdir``, the trained ones of two
stage-2 workdirs over the same tokenizer (grid and codes from the workdirs):

    python benchmarks/sample.py --mode=ar_vs_maskgit --batch_sizes=6,32 --decode
    python benchmarks/sample.py --mode=ar_vs_maskgit --ar_workdir=runs/demo/transformer \
        --maskgit_workdir=runs/demo/maskgit --batch_sizes=6,32 --decode

Each repeat times every case of a batch size once (AR, MaskGIT, then the same with decoding), so
they see the same machine load; the best of ``--repeats`` is kept for each (``seconds``; the
median in ``median_seconds``). The last line is a JSON object: ``images_per_s`` and ``seconds``
per case (``"ar_b6"``, ``"maskgit_b6"``, ``"ar_decode_b6"``, ...),
``maskgit_speedup`` per batch (AR seconds / MaskGIT seconds: the images/s ratio), ``compile_s``,
``token_passes_per_image`` (tokens through the transformer per image: ``N`` for the cached GPT,
``num_steps * (N + 1)`` for MaskGIT, which recomputes the whole grid every step),
``n_params``, ``machine`` (CPU model and cores, or the accelerator), ``device``,
``loadavg_start``/``loadavg_end`` (1-, 5-, 15-minute load averages) and the sampler settings.
"""

import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vqgan_jax.models import registry
from vqgan_jax.models.gpt import GPT
from vqgan_jax.models.maskgit import MaskGIT
from vqgan_jax.samplers import autoregressive
from vqgan_jax.samplers import maskgit as maskgit_sampler
from vqgan_jax.state import maskgit as state_maskgit
from vqgan_jax.state import transformer as state_transformer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo_transformer.py",
                                          "A stage-2 config file.")
_VOCAB = flags.DEFINE_integer("vocab_size", 1024, "Codes (the tokenizer's n_embed).")
_GRID = flags.DEFINE_integer("grid", 16, "Side of the code grid.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per case (the best is kept).")
_TOP_K = flags.DEFINE_integer("top_k", 100, "top_k of the sampler.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "top_p of the sampler.")
_VARIANTS = flags.DEFINE_list("variants", ["cache", "no_cache"],
                              "Samplers to time: cache (KV cache), no_cache (recomputation).")
flags.register_validator("variants", lambda v: bool(v) and set(v) <= {"cache", "no_cache"},
                         "--variants: a non-empty list of cache, no_cache.")
_MODE = flags.DEFINE_enum("mode", "cache", ["cache", "ar_vs_maskgit"],
                          "cache: the GPT with and without the KV cache; ar_vs_maskgit: the GPT "
                          "(KV cache) against MaskGIT's parallel decoding.")
_MASKGIT_CONFIG = config_flags.DEFINE_config_file(
    "maskgit_config", "configs/demo_maskgit.py",
    "ar_vs_maskgit: the MaskGIT config whose model size the random MaskGIT takes.")
_TOKENIZER_CONFIG = config_flags.DEFINE_config_file(
    "tokenizer_config", "configs/demo.py",
    "ar_vs_maskgit --decode without workdirs: the stage-1 config of the random tokenizer.")
_AR_WORKDIR = flags.DEFINE_string("ar_workdir", None,
                                  "ar_vs_maskgit: a trained GPT workdir (with --maskgit_workdir).")
_MASKGIT_WORKDIR = flags.DEFINE_string("maskgit_workdir", None,
                                       "ar_vs_maskgit: a trained MaskGIT workdir (with "
                                       "--ar_workdir, over the same tokenizer).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 8, "ar_vs_maskgit: MaskGIT decoding steps.")
_DECODE = flags.DEFINE_bool("decode", False,
                            "ar_vs_maskgit: also time sampling + decoding to images.")


def main(argv):
    del argv
    if _MODE.value == "ar_vs_maskgit":
        return ar_vs_maskgit()
    config = _CONFIG.value
    num_codes = _GRID.value ** 2
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    gpt = GPT(vocab_size=_VOCAB.value, n_cond_tokens=config.num_classes + 1, dtype=dtype,
              **config.model.to_dict())
    if num_codes > gpt.block_size:
        raise ValueError(f"--grid={_GRID.value} needs block_size >= {num_codes}.")
    t = time.perf_counter()
    params = jax.jit(lambda key: nn.meta.unbox(gpt.init(
        key, jnp.zeros((1, gpt.block_size), jnp.int32))["params"]))(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    jax.block_until_ready(params)
    print(f"init: {n_params} parameters in {time.perf_counter() - t:.1f} s", flush=True)
    result = dict(device=jax.devices()[0].device_kind, num_codes=num_codes, n_params=n_params,
                  codes_per_s={}, seconds={}, compile_s={}, cache_speedup={})
    for b in [int(x) for x in _BATCHES.value]:
        prefix = jnp.full((b, 1), _VOCAB.value, jnp.int32)  # class 0
        for variant in [v for v in ("cache", "no_cache") if v in _VARIANTS.value]:
            use_cache = variant == "cache"
            name = f"{variant}_b{b}"
            t = time.perf_counter()
            compiled = autoregressive.sample.lower(
                params, prefix, jax.random.key(0), gpt=gpt, num_codes=num_codes,
                top_k=_TOP_K.value, top_p=_TOP_P.value, use_cache=use_cache).compile()
            result["compile_s"][name] = round(time.perf_counter() - t, 2)
            print(f"{name}: compiled in {result['compile_s'][name]} s", flush=True)
            best = float("inf")
            for r in range(_REPEATS.value):
                t = time.perf_counter()
                jax.block_until_ready(compiled(params, prefix, jax.random.key(r)))
                best = min(best, time.perf_counter() - t)
            result["seconds"][name] = round(best, 4)
            result["codes_per_s"][name] = round(b * num_codes / best, 1)
            print(f"{name}: {result['codes_per_s'][name]} codes/s ({best:.3f} s a call)",
                  flush=True)
        if f"no_cache_b{b}" in result["seconds"] and f"cache_b{b}" in result["seconds"]:
            result["cache_speedup"][f"b{b}"] = round(
                result["seconds"][f"no_cache_b{b}"] / result["seconds"][f"cache_b{b}"], 2)
    print(json.dumps(result))


def machine() -> str:
    """The machine in words: the accelerator's kind, or the CPU's model name and core count."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} x {device.device_kind}"
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def _random_models(vocab_size: int, grid: int) -> dict:
    """Random GPT and MaskGIT of the sizes of ``--config`` and ``--maskgit_config`` over
    ``vocab_size`` codes and a ``grid`` x ``grid`` grid, and (with ``--decode``) a random
    tokenizer of ``--tokenizer_config``.

    Raises:
      ValueError: the grid does not fit the GPT's block_size, or the tokenizer's n_embed is not
        ``--vocab_size``.
    """
    config, mconfig = _CONFIG.value, _MASKGIT_CONFIG.value
    num_codes = grid * grid
    gpt = GPT(vocab_size=vocab_size, n_cond_tokens=config.num_classes + 1,
              dtype=registry.DTYPES[config.dtype], **config.model.to_dict())
    if num_codes > gpt.block_size:
        raise ValueError(f"--grid={grid} needs block_size >= {num_codes}.")
    model = MaskGIT(vocab_size=vocab_size, seq_len=num_codes, num_classes=mconfig.num_classes,
                    dtype=registry.DTYPES[mconfig.dtype], **mconfig.model.to_dict())
    keys = jax.random.split(jax.random.key(0), 3)
    out = dict(
        gpt=gpt, model=model, grid=(grid, grid), sample=mconfig.sample,
        ar_params=jax.jit(lambda k: nn.meta.unbox(gpt.init(
            k, jnp.zeros((1, gpt.block_size), jnp.int32))["params"]))(keys[0]),
        maskgit_params=jax.jit(lambda k: nn.meta.unbox(model.init(
            k, jnp.zeros((1, num_codes), jnp.int32),
            jnp.full((1,), model.null_token, jnp.int32))["params"]))(keys[1]),
        prefix=lambda b: jnp.full((b, 1), vocab_size, jnp.int32),  # class 0
        vq=None, tokenizer_params=None)
    if _DECODE.value:
        tconfig = _TOKENIZER_CONFIG.value
        if tconfig.model.n_embed != vocab_size:
            raise ValueError(f"--tokenizer_config has n_embed={tconfig.model.n_embed} but "
                             f"--vocab_size={vocab_size}; give --vocab_size="
                             f"{tconfig.model.n_embed}.")
        vq, _ = registry.build_models(tconfig)
        image = jnp.zeros((1, tconfig.image_size, tconfig.image_size, 3), jnp.float32)
        out.update(vq=vq, tokenizer_params=jax.jit(
            lambda k: nn.meta.unbox(vq.init(k, image))["params"])(keys[2]))
    return out


def _trained_models(ar_workdir: str, maskgit_workdir: str) -> dict:
    """The trained GPT and MaskGIT of two stage-2 workdirs, and the MaskGIT's tokenizer.

    Raises:
      ValueError: the two workdirs' code grids or codebook sizes differ.
    """
    ar_params, _, ar_sc, _ = state_transformer.load_for_sampling(ar_workdir, field="--ar_workdir")
    m_params, frozen, m_sc, m_config = state_maskgit.load_for_sampling(
        maskgit_workdir, field="--maskgit_workdir")
    if (tuple(ar_sc.grid), ar_sc.vq.n_embed) != (tuple(m_sc.grid), m_sc.vq.n_embed):
        raise ValueError(f"--ar_workdir samples {ar_sc.grid} grids of {ar_sc.vq.n_embed} codes "
                         f"but --maskgit_workdir {m_sc.grid} of {m_sc.vq.n_embed}; give two "
                         "workdirs over the same tokenizer and image size.")
    conditioning = ar_sc.conditioning
    return dict(
        gpt=ar_sc.gpt, model=m_sc.model, grid=tuple(m_sc.grid), sample=m_config.sample,
        ar_params=ar_params, maskgit_params=m_params,
        prefix=lambda b: autoregressive.class_rows(
            conditioning, [0] if conditioning.kind == "class" else [], b),
        vq=m_sc.vq, tokenizer_params=frozen["tokenizer"])


def ar_vs_maskgit():
    """``--mode=ar_vs_maskgit``: see the module docstring. Prints a line per case and the JSON.

    Raises:
      ValueError: only one of the two workdirs given, ``--num_steps`` outside ``[1, N]``, or as
        :func:`_random_models` / :func:`_trained_models`.
    """
    if (_AR_WORKDIR.value is None) != (_MASKGIT_WORKDIR.value is None):
        raise ValueError("Give both --ar_workdir and --maskgit_workdir (trained models) or "
                         "neither (random models of the configs' sizes).")
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    m = (_trained_models(_AR_WORKDIR.value, _MASKGIT_WORKDIR.value) if _AR_WORKDIR.value
         else _random_models(_VOCAB.value, _GRID.value))
    gpt, model, (gh, gw) = m["gpt"], m["model"], m["grid"]
    num_codes, steps = gh * gw, _NUM_STEPS.value
    if not 1 <= steps <= num_codes:
        raise ValueError(f"--num_steps={steps}: give 1 <= num_steps <= {num_codes}.")
    s = m["sample"]
    settings = dict(ar_top_k=_TOP_K.value, ar_top_p=_TOP_P.value, maskgit_num_steps=steps,
                    maskgit_top_k=int(s.top_k), maskgit_temperature=float(s.temperature),
                    maskgit_choice_temperature=float(s.choice_temperature))

    def ar_codes(params, cond, rng):
        codes = autoregressive.sample(params, cond, rng, gpt=gpt, num_codes=num_codes,
                                      top_k=_TOP_K.value, top_p=_TOP_P.value)
        return codes.reshape(-1, gh, gw)

    def maskgit_codes(params, cond, rng):
        codes = maskgit_sampler.sample(
            params, cond, rng, model=model, num_steps=steps, top_k=int(s.top_k),
            temperature=float(s.temperature), choice_temperature=float(s.choice_temperature))
        return codes.reshape(-1, gh, gw)

    def decoded(codes_fn, params, tokenizer_params, cond, rng):
        codes = codes_fn(params, cond, rng)
        x = m["vq"].apply({"params": tokenizer_params}, codes, method="decode_from_indices")
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    kinds = [""] + (["decode_"] if _DECODE.value else [])
    result = dict(mode="ar_vs_maskgit", machine=machine(), device=jax.devices()[0].device_kind,
                  jax=jax.__version__, weights="trained" if _AR_WORKDIR.value else "random",
                  grid=[gh, gw], vocab_size=model.vocab_size, **settings,
                  n_params=dict(ar=sum(x.size for x in jax.tree.leaves(m["ar_params"])),
                                maskgit=sum(x.size for x in jax.tree.leaves(m["maskgit_params"]))),
                  token_passes_per_image=dict(ar=num_codes, maskgit=steps * (num_codes + 1)),
                  loadavg_start=loadavg_start, images_per_s={}, seconds={}, median_seconds={},
                  compile_s={}, maskgit_speedup={})
    for b in [int(x) for x in _BATCHES.value]:
        conds = dict(ar=m["prefix"](b), maskgit=(
            model.class_tokens(jnp.zeros((b,), jnp.int32)) if model.num_classes
            else jnp.full((b,), model.null_token, jnp.int32)))
        compiled = {}
        for kind in kinds:
            for name, fn in (("ar", ar_codes), ("maskgit", maskgit_codes)):
                params = m[f"{name}_params"]
                if kind:
                    fn, args = functools.partial(decoded, fn), (params, m["tokenizer_params"])
                else:
                    args = (params,)
                case = f"{name}_{kind}b{b}"
                t = time.perf_counter()
                compiled[case] = (jax.jit(fn).lower(*args, conds[name], jax.random.key(0))
                                  .compile(), args + (conds[name],))
                result["compile_s"][case] = round(time.perf_counter() - t, 2)
        times = {case: [] for case in compiled}
        for r in range(_REPEATS.value):  # every case once in each repeat: the same load
            for case, (fn, args) in compiled.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(*args, jax.random.key(r)))
                times[case].append(time.perf_counter() - t)
        for case, ts in times.items():
            result["seconds"][case] = round(min(ts), 4)
            result["median_seconds"][case] = round(float(np.median(ts)), 4)
            result["images_per_s"][case] = round(b / min(ts), 2)
            print(f"{case}: {result['images_per_s'][case]} images/s ({min(ts):.3f} s a call "
                  f"of {b}, best of {len(ts)}; median {np.median(ts):.3f} s)", flush=True)
        for kind in kinds:
            ratio = min(times[f"ar_{kind}b{b}"]) / min(times[f"maskgit_{kind}b{b}"])
            result["maskgit_speedup"][f"{kind}b{b}"] = round(ratio, 2)
            print(f"MaskGIT ({steps} steps) / AR images per second, {kind or 'codes_'}b{b}: "
                  f"{ratio:.2f}x", flush=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
