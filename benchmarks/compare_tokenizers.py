"""Tokenizer variants trained side by side on the demo photos: what each term and quantizer buys.

    python benchmarks/compare_tokenizers.py --workdir=/tmp/compare --steps=1000

Trains each variant below with ``python -m vqgan_jax.main`` for the same ``--steps`` (same
data, crops, ``--batch_size``, default 4 as the demo, and seed) into ``--workdir/<name>`` (an
existing run there resumes, so a cut run can be finished), then prints a markdown table of the
held-out metrics each run wrote (``metrics.json``: PSNR, SSIM, LPIPS, codebook usage on the
held-out photos chelsea and coffee) with the median train step time, writes
``--workdir/comparison.png`` (a row per held-out photo: the original, then each variant's
reconstruction) and, last, a JSON object with every figure. Kept out of the test suite: about
an hour on 2 CPU cores at 1000 steps.

The variants, each configs/demo.py (the demo's recipe: L1 + LPIPS + VQ loss, EMA codebook with
dead-code restart, and 64x64 crops at the photos' own scale) with one thing changed:

* ``vqvae``: configs/vqvae_demo.py, the VQ-VAE baseline (L2 + VQ loss only);
* ``vqgan_l1``: no perceptual term (L1 + VQ loss: the demo before 2026-12-04);
* ``vqgan``: configs/demo.py as the demo trains it;
* ``vqgan_full``: the PatchGAN switched on at ``--disc_start`` (default: half-way) with
  taming's adaptive weight (``--disc_weight``, 0.8), hinge loss: the full taming loss;
* ``fsq``: FSQ (levels 8, 5, 5, 5: 1000 codes of 4 dimensions) instead of the EMA codebook;
* ``vit_vqgan``: configs/vitvqgan_demo.py, ViT encoder/decoder with factorized l2-normalized
  codes (patch 4, the same 16x16 code grid).
"""

import json
import pathlib
import statistics
import subprocess
import sys

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs.", required=True)
_STEPS = flags.DEFINE_integer("steps", 1000, "Train steps of every variant.")
_DISC_START = flags.DEFINE_integer("disc_start", None, "vqgan_full: step the PatchGAN starts "
                                   "(default: --steps // 2).")
_DISC_WEIGHT = flags.DEFINE_float("disc_weight", 0.8, "vqgan_full: scale of the adaptive weight "
                                  "(taming's 0.8).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch of every variant (configs/demo.py trains at "
                              "4, vitvqgan_demo.py at 8: one batch keeps them comparable).")
_ONLY = flags.DEFINE_list("only", [], "Run only these variants (default: all).")

ROOT = pathlib.Path(__file__).resolve().parents[1]

VARIANTS = {
    "vqvae": ("vqvae_demo", []),
    "vqgan_l1": ("demo", ["--config.loss.perceptual_weight=0.0"]),
    "vqgan": ("demo", []),
    "vqgan_full": ("demo", []),  # + disc_start and disc_weight below
    "fsq": ("demo", ["--config.quantizer.kind=fsq", "--config.quantizer.fsq_levels=(8,5,5,5)",
                     "--config.quantizer.restart_unused_steps=0",  # no codebook to restart
                     "--config.model.embed_dim=4", "--config.model.n_embed=1000",
                     "--config.model.l2_normalize_codes=False"]),
    "vit_vqgan": ("vitvqgan_demo", []),
}


def train(name: str, workdir: pathlib.Path) -> None:
    config, overrides = VARIANTS[name]
    if name == "vqgan_full":
        disc_start = _STEPS.value // 2 if _DISC_START.value is None else _DISC_START.value
        overrides = overrides + [f"--config.loss.disc_start={disc_start}",
                                 f"--config.loss.disc_weight={_DISC_WEIGHT.value}"]
    cmd = [sys.executable, "-m", "vqgan_jax.main", f"--config={ROOT / 'configs' / config}.py",
           f"--workdir={workdir}", f"--config.num_train_steps={_STEPS.value}",
           f"--config.batch_size={_BATCH.value}", "--config.checkpoint_every_steps=100000",
           *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=open(workdir.parent / f"{name}.log", "w"))


def step_ms(workdir: pathlib.Path) -> float:
    """Median train step time from scalars.jsonl (the first interval, with compile, left out)."""
    rates = [r["steps_per_sec"] for r in map(json.loads, open(workdir / "scalars.jsonl"))
             if "steps_per_sec" in r]
    return 1000.0 / statistics.median(rates[1:] or rates)


def reconstructions(workdir: pathlib.Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """The held-out photos reconstructed by the run's tokenizer (its EMA weights if kept)."""
    import jax
    from vqgan_jax import parallel, scoring, workdir as workdir_lib
    from vqgan_jax.models import registry
    from vqgan_jax.models.lpips import load_lpips_params

    mesh = parallel.create_mesh(devices=jax.devices()[:1])
    config, g_params, _ = workdir_lib.restore_tokenizer(str(workdir), None, mesh)
    vq, _ = registry.build_models(config)
    return scoring.evaluate(g_params, load_lpips_params(), images, vq)[1]


def picture(names: list[str], originals: list[np.ndarray],
            recs: dict[str, list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """uint8 picture: a row per photo, original then each variant; a label strip on top."""
    from PIL import Image, ImageDraw

    to_u8 = lambda a: np.round((np.clip(a, -1, 1) + 1) * 127.5).astype(np.uint8)
    columns = [("original", originals)] + [(n, recs[n]) for n in names]
    widths = [max(im.shape[1] for im in images) for _, images in columns]
    rows = []
    for i in range(len(originals)):
        h = originals[i].shape[0]
        cells = []
        for (_, images), w in zip(columns, widths):
            cell = np.full((h, w + gap, 3), 255, np.uint8)
            cell[:, :images[i].shape[1]] = to_u8(images[i])
            cells.append(cell)
        rows.append(np.concatenate(cells, 1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    body = np.concatenate(rows[:-1], 0)
    header = Image.new("RGB", (body.shape[1], 16), "white")
    draw = ImageDraw.Draw(header)
    x = 0
    for (name, _), w in zip(columns, widths):
        draw.text((x + 2, 2), name, fill="black")
        x += w + gap
    return np.concatenate([np.asarray(header), body], 0)


def main(argv):
    del argv
    from PIL import Image
    from vqgan_jax.data import pipeline, sources

    names = [n for n in VARIANTS if not _ONLY.value or n in _ONLY.value]
    root = pathlib.Path(_WORKDIR.value).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        train(name, root / name)

    originals = pipeline.eval_images(sources.get_source("demo", "validation"), multiple_of=4,
                                     max_images=2)
    results, recs = {}, {}
    for name in names:
        metrics = json.load(open(root / name / "metrics.json"))
        results[name] = dict(psnr=metrics["psnr"], ssim=metrics["ssim"], lpips=metrics["lpips"],
                             codebook_usage=metrics["codebook_usage"],
                             perplexity=metrics["perplexity"], step=metrics["step"],
                             step_ms=step_ms(root / name))
        recs[name] = reconstructions(root / name, originals)
    Image.fromarray(picture(names, originals, recs)).save(root / "comparison.png")

    print(f"\n{_STEPS.value} steps each, held-out chelsea + coffee at full size\n")
    print("| variant | PSNR (dB) | SSIM | LPIPS | codebook usage | perplexity | step (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lpips']:.3f} | "
              f"{100 * r['codebook_usage']:.1f}% | {r['perplexity']:.1f} | {r['step_ms']:.0f} |")
    print(f"\nwrote {root / 'comparison.png'}")
    print(json.dumps(dict(steps=_STEPS.value, results=results)))


if __name__ == "__main__":
    app.run(main)
