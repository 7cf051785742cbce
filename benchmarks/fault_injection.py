"""Every workdir fault of the README's "When things go wrong", injected for real into tiny runs of
``python -m vqgan_jax.main`` in a temporary directory; one line per fault:

    python benchmarks/fault_injection.py        # about 3 minutes on 2 CPU cores

    second job on the workdir: survived, lost nothing
    ...

"Lost nothing": every checkpoint that existed before the fault is still there byte for byte
(a damaged one moved to ``damaged_checkpoints/``, not deleted), and so is every line of
``scalars.jsonl``. A fault that is not survived prints what went wrong; the exit status is 1
if any was not. tests/test_faults.py checks the same, and the messages, in the test suite.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.image_size=32", "--config.batch_size=4", "--config.model.ch=32",
        "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
        "--config.model.attn_resolutions=(16,)", "--config.model.z_channels=8",
        "--config.model.embed_dim=8", "--config.model.n_embed=32", "--config.disc.ndf=8",
        "--config.disc.n_layers=2", "--config.log_every_steps=1", "--config.eval_every_steps=100",
        "--config.checkpoint_every_steps=2", "--config.num_eval_images=2",
        "--config.loss.disc_start=0", "--config.loss.perceptual_weight=0",
        "--config.max_checkpoints_to_keep=100"]
ENV = {k: v for k, v in os.environ.items() if k != "VQGAN_JAX_FAULT"}
DATA = pathlib.Path()  # a folder of small random images, made in main()


def make_images(root: pathlib.Path) -> pathlib.Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                root / label / f"{i}.png")
    return root


def main_command(workdir: pathlib.Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "vqgan_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}",
            f"--workdir={workdir}", *TINY, f"--config.dataset=folder:{DATA}",
            f"--config.num_train_steps={steps}"]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=600)


def expect(ok: bool, what: str, result: subprocess.CompletedProcess | None = None) -> None:
    if not ok:
        tail = "" if result is None else " | " + " / ".join(result.stderr.strip().splitlines()[-2:])
        raise AssertionError(what + tail[:600])


def error_line(result: subprocess.CompletedProcess) -> str:
    return next((l for l in result.stderr.splitlines() if l.startswith("Error: ")), "")


def checkpoints(workdir: pathlib.Path) -> dict[int, str]:
    """{step: SHA-256 of every file of that checkpoint folder}."""
    out = {}
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            digest = hashlib.sha256()
            for f in sorted(p for p in step_dir.rglob("*") if p.is_file()):
                digest.update(str(f.relative_to(step_dir)).encode() + f.read_bytes())
            out[int(step_dir.name)] = digest.hexdigest()
    return out


def lost_nothing(workdir: pathlib.Path, before: dict[int, str], scalars: str,
                 damaged: tuple[int, ...] = ()) -> None:
    after = checkpoints(workdir)
    for step, digest in before.items():
        if step in damaged:
            expect((workdir / "damaged_checkpoints" / str(step)).is_dir(),
                   f"damaged checkpoint {step} not kept in damaged_checkpoints/")
        else:
            expect(after.get(step) == digest, f"checkpoint {step} changed or lost")
    expect((workdir / "scalars.jsonl").read_text().startswith(scalars), "scalars.jsonl lost lines")


def truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- the faults

def second_job(w: pathlib.Path) -> None:
    before, scalars = checkpoints(w), (w / "scalars.jsonl").read_text()
    first = subprocess.Popen(main_command(w, 1000), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while (w / "scalars.jsonl").read_text() == scalars:  # until it trains
            expect(first.poll() is None and time.monotonic() < deadline, "first job stalled")
            time.sleep(0.5)
        second = run(main_command(w, 1000))
        expect(second.returncode == 1 and "is in use by another process" in error_line(second)
               and f"pid {first.pid}" in error_line(second), "second job not refused", second)
        first.send_signal(signal.SIGTERM)
        expect(first.wait(timeout=300) == 0, "first job did not save and exit on SIGTERM")
    finally:
        first.kill()
    expect(not (w / "LOCK").exists(), "lock not released")
    lost_nothing(w, before, scalars)


def crash(w: pathlib.Path) -> None:
    before, scalars = checkpoints(w), (w / "scalars.jsonl").read_text()
    killed = run(main_command(w, 8), env=dict(ENV, VQGAN_JAX_FAULT="7:SIGKILL"))
    expect(killed.returncode == -signal.SIGKILL and (w / "LOCK").exists(), "no stale lock left")
    result = run(main_command(w, 8))
    expect(result.returncode == 0 and "Taking over the stale lock" in result.stderr,
           "stale lock not taken over", result)
    lost_nothing(w, before, scalars)


def damaged_newest(w: pathlib.Path) -> None:
    before, scalars = checkpoints(w), (w / "scalars.jsonl").read_text()
    newest = max(before)
    target = array_file(w / "checkpoints" / str(newest))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10          # one flipped bit: only the recorded checksum sees it
    target.write_bytes(bytes(data))
    result = run(main_command(w, newest + 2))
    expect(result.returncode == 0 and f"checkpoints/{newest} is damaged" in result.stderr,
           "no fallback past the damaged checkpoint", result)
    lost_nothing(w, before, scalars, damaged=(newest,))


def none_intact(w: pathlib.Path) -> None:
    for f in (w / "checkpoints").rglob("*"):
        if f.is_file():
            truncate(f)
    before = {str(p): p.read_bytes() for p in w.rglob("*") if p.is_file()}
    for command in (main_command(w, 100), [sys.executable, "-m", "vqgan_jax.evaluate",
                                           f"--workdir={w}", "--image_size=32", "--batch_size=1"]):
        result = run(command)
        expect(result.returncode == 1 and "can be restored" in error_line(result)
               and "Nothing was deleted" in error_line(result), "no clear error", result)
    expect(before == {str(p): p.read_bytes() for p in w.rglob("*") if p.is_file()},
           "files changed")


def failing_save(w: pathlib.Path) -> None:
    before, scalars = checkpoints(w), (w / "scalars.jsonl").read_text()
    steps = max(before) + 2
    limited = run(["bash", "-c", 'ulimit -f 256 && exec "$@"', "bash", *main_command(w, steps)])
    expect(limited.returncode == 1 and "Saving checkpoint" in error_line(limited),
           "no clear save error", limited)
    lost_nothing(w, before, scalars)
    resumed = run(main_command(w, steps))  # disk space back: the same command resumes
    expect(resumed.returncode == 0 and max(checkpoints(w)) == steps, "no resume", resumed)


def failing_metrics(w: pathlib.Path) -> None:
    before = checkpoints(w)
    (w / "scalars.jsonl").rename(w / "scalars.jsonl.kept")
    (w / "scalars.jsonl").mkdir()
    result = run(main_command(w, max(before) + 2))
    expect(result.returncode == 0 and "write_scalars failed" in result.stderr,
           "training stopped", result)
    shutil.rmtree(w / "scalars.jsonl")
    (w / "scalars.jsonl.kept").rename(w / "scalars.jsonl")
    lost_nothing(w, before, "")


def evaluations(w: pathlib.Path) -> None:
    for extra in ([], ["--num_images=1"]):
        result = run([sys.executable, "-m", "vqgan_jax.evaluate", f"--workdir={w}",
                      "--image_size=32", "--batch_size=1", "--num_images=2", *extra])
        expect(result.returncode == 0, "evaluation failed", result)
    index = json.loads((w / "eval" / "index.json").read_text())
    expect(len(index) == 2 and all((w / "eval" / e["file"]).exists() for e in index)
           and index[0]["file"] != index[1]["file"], "an evaluation was overwritten")


FAULTS = {"second job on the workdir": second_job, "crash (SIGKILL), stale lock": crash,
          "damaged newest checkpoint": damaged_newest, "no intact checkpoint": none_intact,
          "failing save (file size limit)": failing_save,
          "failing metrics write": failing_metrics, "repeated evaluations": evaluations}


def main() -> int:
    global DATA
    failed = 0
    with tempfile.TemporaryDirectory(prefix="vqgan_jax_faults_") as tmp:
        DATA = make_images(pathlib.Path(tmp) / "images")
        # The runs share compiled programs (a restarted job loads what the first compiled).
        ENV.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tmp, "xla_cache"))
        trained = pathlib.Path(tmp) / "trained"
        result = run(main_command(trained, 4))
        if result.returncode != 0:
            print("training the tiny workdir failed:", result.stderr[-2000:])
            return 1
        for name, fault in FAULTS.items():
            workdir = pathlib.Path(shutil.copytree(trained, pathlib.Path(tmp) / name))
            try:
                fault(workdir)
                print(f"{name}: survived, lost nothing", flush=True)
            except Exception as e:  # noqa: BLE001  (report every fault, then the status)
                failed += 1
                print(f"{name}: FAILED: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
