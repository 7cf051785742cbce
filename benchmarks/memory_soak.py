"""Long-run memory check: the demo config trained for 3x its steps, resident memory sampled.

    python benchmarks/memory_soak.py --workdir=/tmp/soak            # 3 x 800 demo steps
    python benchmarks/memory_soak.py --workdir=/tmp/soak --factor=1 --interval_s=5

Runs ``python -m vqgan_jax.main --config=configs/demo.py`` in a child process (in a fresh
``--workdir``; an existing one is refused so that no run is overwritten), reads the child's
resident set size (VmRSS, Linux /proc) every ``--interval_s`` seconds together with the last
step it logged, and prints one line per sample and, last, a JSON object: ``rss_mib`` after
warm-up (the first sample at or past ``--warmup_fraction`` of the steps) and at the last
training step sampled (the final evaluation at full image size is left out), the growth
between them in MiB and MiB per 1000 steps, and the peaks. Kept out of
the test suite: it runs for about half an hour on 2 CPU cores.
"""

import json
import pathlib
import subprocess
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "New directory for the run.", required=True)
_FACTOR = flags.DEFINE_float("factor", 3.0, "Train factor x the demo's num_train_steps.")
_INTERVAL = flags.DEFINE_float("interval_s", 10.0, "Seconds between memory samples.")
_WARMUP = flags.DEFINE_float("warmup_fraction", 0.2, "Fraction of steps counted as warm-up.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_STEPS = 800  # configs/demo.py num_train_steps


def rss_mib(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def last_step(workdir: pathlib.Path) -> int:
    path = workdir / "scalars.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def main(argv):
    del argv
    workdir = pathlib.Path(_WORKDIR.value).resolve()
    if workdir.exists():
        raise app.UsageError(f"--workdir={workdir} exists; pass a new directory.")
    steps = int(DEMO_STEPS * _FACTOR.value)
    cmd = [sys.executable, "-m", "vqgan_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}",
           f"--workdir={workdir}", f"--config.num_train_steps={steps}",
           f"--config.checkpoint_every_steps={DEMO_STEPS}"]
    child = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    samples, start = [], time.monotonic()
    while child.poll() is None:
        time.sleep(_INTERVAL.value)
        rss = rss_mib(child.pid)
        if rss is not None:
            samples.append({"t_s": round(time.monotonic() - start, 1),
                            "step": last_step(workdir), "rss_mib": round(rss, 1)})
            print(json.dumps(samples[-1]), flush=True)
    if child.returncode != 0:
        raise SystemExit(f"training exited with {child.returncode}")
    # Training samples only: at the last step the job evaluates the held-out photos at full
    # size (LPIPS-VGG16 included), a one-off peak that is not growth.
    trained = [s for s in samples if _WARMUP.value * steps <= s["step"] < steps]
    first, last = trained[0], trained[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    print(json.dumps({
        "steps": steps, "wall_s": round(time.monotonic() - start, 1),
        "rss_after_warmup_mib": first["rss_mib"], "rss_end_mib": last["rss_mib"],
        "growth_mib": round(growth, 1),
        "growth_mib_per_1000_steps": round(1000 * growth / max(last["step"] - first["step"], 1), 2),
        "peak_training_mib": max(s["rss_mib"] for s in trained),
        "peak_mib": max(s["rss_mib"] for s in samples),
        "warmup_step": first["step"], "end_step": last["step"]}))


if __name__ == "__main__":
    app.run(main)
