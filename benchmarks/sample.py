"""Speed of the jitted stage-2 sampler, with the KV cache and without it.

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
"""

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from vqgan_jax.models.gpt import GPT
from vqgan_jax.samplers import autoregressive

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


def main(argv):
    del argv
    config = _CONFIG.value
    num_codes = _GRID.value ** 2
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    gpt = GPT(vocab_size=_VOCAB.value, n_cond_tokens=config.num_classes + 1, dtype=dtype,
              **config.model.to_dict())
    if num_codes > gpt.block_size:
        raise ValueError(f"--grid={_GRID.value} needs block_size >= {num_codes}.")
    params = jax.jit(lambda key: nn.meta.unbox(gpt.init(
        key, jnp.zeros((1, gpt.block_size), jnp.int32))["params"]))(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
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


if __name__ == "__main__":
    app.run(main)
