"""Nothing is lost: exact resume after SIGKILL, SIGTERM preemption, a save cut short,
non-finite steps, and bad workdirs. The uninterrupted run that the resumed one is compared
with is also the command line's end-to-end test on a folder of images (outputs, the switch to
the discriminator at disc_start)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from conftest import ROOT, load_config, shrink
from test_main import TINY, make_folder
from test_train_step import lpips_params, tiny_setup  # noqa: F401  (fixture)
from vqgan_jax import parallel
from vqgan_jax.trainers import loop
from vqgan_jax.trainers import tokenizer as T


def run(workdir: pathlib.Path, data: pathlib.Path, steps: int, fault: str | None = None,
        log_compiles: bool = False, checkpoint_every: int = 2):
    """``python -m vqgan_jax.main`` on the folder ``data``, run from workdir's parent with a
    relative --workdir (as a user would type it); evaluation every 2 steps. ``log_compiles``:
    JAX names every program it compiles (or loads from the cache) in stderr."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES=str(int(log_compiles)))
    env.pop(loop.FAULT_ENV, None)
    if fault:
        env[loop.FAULT_ENV] = fault
    # disc_start=1: step 1 runs the generator-only program, the later steps the full one.
    flags = [*TINY, f"--config.dataset=folder:{data}", f"--config.num_train_steps={steps}",
             f"--config.checkpoint_every_steps={checkpoint_every}", "--config.eval_every_steps=2",
             "--config.max_checkpoints_to_keep=10", "--config.loss.disc_start=1"]
    return subprocess.run(
        [sys.executable, "-m", "vqgan_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}",
         f"--workdir={workdir.name}", *flags], cwd=workdir.parent, env=env, capture_output=True,
        text=True, timeout=300)


def logged_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (workdir / "scalars.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def final_params(workdir: pathlib.Path, step: int):
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",)) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.start_early
def test_killed_preempted_and_resumed_run_is_bit_identical_to_a_straight_run(tmp_path):
    data = make_folder(tmp_path / "images")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # A checkpoint every step: the state the preempted run saves at step 5 is compared with it.
    result = run(straight, data, 7, checkpoint_every=1)
    assert result.returncode == 0, result.stderr[-3000:]
    # The straight run is the command line's end-to-end test on a folder of images.
    assert "corrupt.jpg" in result.stderr  # the undecodable file is logged and skipped
    # It crosses disc_start: both programs compiled, each once (loop.compile_step's log line).
    assert result.stderr.count("Compiled train_step before disc_start in ") == 1
    assert result.stderr.count("Compiled train_step in ") == 1
    # A quiet console (vqgan_jax.console): no orbax internals, a plain progress line per log
    # (not a terminal), a few dozen lines in all.
    console = result.stdout + result.stderr
    for internal in ("orbax", "CheckpointManager", "handler"):
        assert internal not in console, console[-3000:]
    assert len(console.splitlines()) <= 40, console[-3000:]
    assert "step 7/7: loss " in console and " img/s, ETA " in console
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["step"] == 7
    for key in ("psnr", "lpips", "codebook_usage", "perplexity"):
        assert np.isfinite(metrics[key]), key
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1
    picture = Image.open(straight / "reconstructions.png")
    assert picture.size[1] >= 2 * 32  # two held-out rows of original | reconstruction
    assert list(straight.glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (straight / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/psnr" in r] == [2, 4, 6, 7]  # every 2 and the end
    # Every checkpoint_every_steps, and the last step.
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir()
                  if p.name.isdigit()) == [1, 2, 3, 4, 5, 6, 7]

    # A crash (SIGKILL) after step 5 (checkpoints every 2 steps): the restart resumes from the
    # newest complete checkpoint (step 4, or 2 when the kill cut step 4's async save short).
    result = run(broken, data, 7, fault="5:SIGKILL")
    assert result.returncode == -signal.SIGKILL
    # A save cut short by a kill leaves a temporary folder, newer than the others: ignored.
    partial = broken / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    # Preemption (SIGTERM) after the resumed run's step 5: it saves step 5 (between the steps
    # it checkpoints on) and exits 0.
    result = run(broken, data, 7, fault="5:SIGTERM", log_compiles=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed" in result.stderr and "from step 0" not in result.stderr
    assert "Preempted: saved step 5" in result.stderr
    # Resumed past disc_start: only the full step is needed, so only it is compiled; and the
    # state is restored onto its shapes: the init program is not built for a resume.
    assert "Compiled train_step in " in result.stderr
    assert "Compiled train_step before disc_start" not in result.stderr
    assert "jit(train_step)" in result.stderr and "jit(init_state)" not in result.stderr

    expected = dict(logged_losses(straight))
    assert sorted(expected) == [1, 2, 3, 4, 5, 6, 7]
    got = logged_losses(broken)  # steps re-run after the crash appear twice
    assert {s for s, _ in got} == {1, 2, 3, 4, 5} and len(got) > 5
    for step, loss in got:
        assert loss == expected[step], (step, loss, expected[step])
    a, b = final_params(straight, 5), final_params(broken, 5)
    assert int(a["step"]) == int(b["step"]) == 5
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_step_is_skipped_for_both_models(lpips_params):  # noqa: F811
    _, sc, mesh, state, shardings, batch = tiny_setup(disc_start=0)
    step = T.jit_train_step(sc, mesh, shardings, lpips_params)
    before = jax.device_get(state)
    nan_batch = {"image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
    state, metrics = step(state, nan_batch, lpips_params)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == 1
    for x, y in zip(jax.tree.leaves(before.replace(step=0)), jax.tree.leaves(after.replace(step=0))):
        np.testing.assert_array_equal(x, y)  # params, optimizer states, BatchNorm stats
    state, metrics = step(state, batch, lpips_params)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 2
    moved = jax.device_get(state.g_params["decoder"]["conv_out"]["kernel"])
    assert not np.array_equal(moved, before.g_params["decoder"]["conv_out"]["kernel"])


def test_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(
        tmp_path, monkeypatch, one_device):
    config = shrink(load_config("demo"))
    config.update(num_train_steps=20, checkpoint_every_steps=2, log_every_steps=1,
                  eval_every_steps=1000, num_eval_images=1, max_consecutive_nonfinite=3)
    config.loss.perceptual_weight = 0.0
    calls = {"n": 0}
    real_global_batch = parallel.global_batch

    def poisoned(local, mesh):  # batches 3, 4, 5, ... hold a NaN
        calls["n"] += 1
        if calls["n"] >= 3:
            local = dict(local, image=np.where(np.arange(local["image"].size).reshape(
                local["image"].shape) == 0, np.nan, local["image"]).astype(np.float32))
        return real_global_batch(local, mesh)

    monkeypatch.setattr(parallel, "global_batch", poisoned)
    with pytest.raises(FloatingPointError, match="stopped at step 5"):
        T.train_and_evaluate(config, str(tmp_path))
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        assert manager.all_steps() == [2]  # nothing saved during or after the bad streak
    rows = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["train/nonfinite_steps"] for r in rows if "train/loss" in r}
    assert skipped[2] == 0 and skipped[4] == 2


def test_unwritable_workdir_fails_before_compiling(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = shrink(load_config("demo"))
    with pytest.raises(ValueError, match="--workdir=.*not writable"):
        T.train_and_evaluate(config, str(blocker / "run"))


def test_max_consecutive_nonfinite_must_be_positive():
    config = load_config("demo")
    config.max_consecutive_nonfinite = 0
    with pytest.raises(ValueError, match="config.max_consecutive_nonfinite"):
        T.validate_config(config, num_devices=1)


@pytest.mark.parametrize("field", ["log_every_steps", "checkpoint_every_steps", "eval_every_steps"])
def test_step_intervals_must_be_positive(field):
    config = load_config("demo")
    config[field] = 0
    with pytest.raises(ValueError, match=f"config.{field}=0 must be >= 1"):
        T.validate_config(config, num_devices=1)
