"""Workdir faults through the command line (issue 14): a second job on one workdir, the stale
lock and damaged newest checkpoint (a flipped bit) a crash leaves, with a metrics file that
cannot be written, no intact checkpoint at all, a save that fails (file size limit), and
evaluations kept side by side. Each test works on its own copy of one tokenizer workdir trained
for 4 steps (checkpoints 2 and 4)."""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, built_once
from test_main import TINY, make_folder
from vqgan_jax.trainers import loop


def env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(loop.FAULT_ENV, None)
    return env


def main_command(workdir: pathlib.Path, data: pathlib.Path, steps: int, *extra: str) -> list:
    return [sys.executable, "-m", "vqgan_jax.main", f"--config={ROOT / 'configs' / 'demo.py'}",
            f"--workdir={workdir}", *TINY, f"--config.dataset=folder:{data}",
            f"--config.num_train_steps={steps}", "--config.max_checkpoints_to_keep=10", *extra]


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300, **kwargs)


def error_line(stderr: str) -> str:
    """The message the command line exits with (asyncio may log its own noise after it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def restore(workdir: pathlib.Path, step: int) -> dict:
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",)) as manager:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]


def assert_same_arrays(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)


def snapshot(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps on a folder of images; read-only (the tests change copies)."""
    def build(root):
        result = run(main_command(root / "trained", make_folder(root / "images"), 4))
        assert result.returncode == 0, result.stderr[-3000:]
    root = built_once(tmp_path_factory, "faults", build)
    workdir, data = root / "trained", root / "images"
    assert steps(workdir) == [2, 4] and not (workdir / "LOCK").exists()
    sums = json.loads((workdir / "checkpoint_checksums" / "4.json").read_text())
    assert sums == snapshot(workdir / "checkpoints" / "4")   # every file, as saved
    return workdir, data


@pytest.fixture
def workdir(trained, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained[0], tmp_path / "run"))


def test_second_process_is_refused_and_sigterm_releases_the_lock(trained, workdir):
    data = trained[1]
    # No evaluations in the first job: it trains on while the second process starts, and
    # nothing here reads its held-out metrics.
    first = subprocess.Popen(main_command(workdir, data, 1000, "--config.eval_every_steps=1000"),
                             cwd=ROOT, env=env(),
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(json.loads(line)["step"] > 4 for line in
                      (workdir / "scalars.jsonl").read_text().splitlines()):
            assert first.poll() is None and time.monotonic() < deadline, "first job stalled"
            time.sleep(0.5)
        holder = json.loads((workdir / "LOCK").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = steps(workdir)

        second = run(main_command(workdir, data, 1000))
        assert second.returncode == 1
        message = error_line(second.stderr)
        assert message.startswith(f"Error: --workdir={workdir} is in use by another process")
        assert (f"host {socket.gethostname()}, pid {first.pid}, started {holder['started']}"
                in message and "--force_unlock" in message)
        assert "Compiled" not in second.stderr and "Resumed" not in second.stderr
        assert json.loads((workdir / "LOCK").read_text()) == holder  # still the first job's

        first.send_signal(signal.SIGTERM)  # preemption: save, release the lock, exit 0
        stderr = first.communicate(timeout=120)[1]
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert "Preempted: saved step" in stderr
    assert not (workdir / "LOCK").exists()
    assert set(before) < set(steps(workdir))


def test_a_crash_leaves_a_stale_lock_and_a_damaged_checkpoint_the_restart_survives_both(
        trained, workdir):
    """... and a metrics file that cannot be written: logged, and training goes on."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    (workdir / "LOCK").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "yesterday"}))
    damaged = largest_array_file(workdir / "checkpoints" / "4")
    data = bytearray(damaged.read_bytes())   # one bit flipped in the newest checkpoint: orbax
    data[len(data) // 2] ^= 0x10             # would restore it silently, its checksum does not
    damaged.write_bytes(bytes(data))
    kept = damaged.read_bytes()
    (workdir / "scalars.jsonl").unlink()
    (workdir / "scalars.jsonl").mkdir()  # every append to it now fails

    result = run(main_command(workdir, trained[1], 5))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"Metrics writer {workdir / 'scalars.jsonl'}: write_scalars failed "
            "(IsADirectoryError") in result.stderr
    assert (f"Taking over the stale lock {workdir / 'LOCK'}: its holder (host "
            f"{socket.gethostname()}, pid {int(dead.stdout)}, started yesterday) is no longer "
            "running") in result.stderr
    assert f"Checkpoint {workdir / 'checkpoints' / '4'} is damaged or unreadable" in result.stderr
    assert f"{damaged} differs from its SHA-256 at save" in result.stderr
    assert f"Resumed from {workdir / 'checkpoints'} at step 2" in result.stderr
    assert not (workdir / "LOCK").exists()
    # The damaged folder is moved aside, not deleted; steps 3 and 4 were trained again, then 5.
    relative = damaged.relative_to(workdir / "checkpoints" / "4")
    assert (workdir / "damaged_checkpoints" / "4" / relative).read_bytes() == kept
    assert steps(workdir) == [2, 4, 5]
    assert int(restore(workdir, 4)["step"]) == 4
    assert json.loads((workdir / "metrics.json").read_text())["step"] == 5


def test_no_intact_checkpoint_stops_every_command_with_one_message_and_deletes_nothing(
        trained, workdir):
    for step_dir in (workdir / "checkpoints").iterdir():  # a copy of the workdir cut short
        for f in step_dir.rglob("*"):
            if f.is_file():
                os.truncate(f, f.stat().st_size // 2)
    before = snapshot(workdir)
    message = f"Error: No checkpoint in {workdir / 'checkpoints'} can be restored: step 4 ("
    commands = {"main": main_command(workdir, trained[1], 6),
                "evaluate": [sys.executable, "-m", "vqgan_jax.evaluate", f"--workdir={workdir}",
                             "--image_size=32", "--batch_size=1"],
                "sample": [sys.executable, "-m", "vqgan_jax.sample", f"--workdir={workdir}",
                           f"--out={workdir.parent / 'samples.png'}"]}
    for name, command in commands.items():
        result = run(command)
        assert result.returncode == 1, (name, result.stderr[-3000:])
        assert error_line(result.stderr).startswith(message), (name, result.stderr[-3000:])
        assert "; step 2 (" in error_line(result.stderr) and "Nothing was deleted" in error_line(
            result.stderr), name
        assert snapshot(workdir) == before, name
    assert not (workdir.parent / "samples.png").exists()


@pytest.mark.start_early
def test_failing_save_stops_the_run_and_keeps_the_previous_checkpoint(trained, workdir):
    scalars = (workdir / "scalars.jsonl").read_text()
    # RLIMIT_FSIZE of 256 KiB: every array file of a checkpoint is larger, logs are not. The
    # save of step 6 fails in the background; the save of step 7 reports it.
    result = run(["bash", "-c", 'ulimit -f 256 && exec "$@"', "bash",
                  *main_command(workdir, trained[1], 7)])
    assert result.returncode == 1, result.stderr[-3000:]
    message = error_line(result.stderr)
    assert message.startswith(f"Error: Saving checkpoint step 6 in {workdir / 'checkpoints'} "
                              "failed"), result.stderr[-3000:]
    assert "File too large" in message and "newest: 4" in message
    assert steps(workdir) == [2, 4] and not (workdir / "LOCK").exists()
    assert_same_arrays(restore(workdir, 4), restore(trained[0], 4))
    assert (workdir / "scalars.jsonl").read_text().startswith(scalars)


def test_each_evaluation_is_kept_with_an_index(workdir):
    common = [sys.executable, "-m", "vqgan_jax.evaluate", f"--workdir={workdir}",
              "--image_size=32", "--batch_size=1", "--num_images=2"]
    for extra in ([], ["--step=2"]):
        result = run(common + extra)
        assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((workdir / "eval" / "index.json").read_text())
    assert [(e["step"], e["split"]) for e in index] == [(4, "validation"), (2, "validation")]
    protocol = index[0]["protocol"]
    assert index[1]["protocol"] == protocol  # same settings, another step: another file
    for entry in index:
        assert entry["file"] == f"step_{entry['step']:06d}_validation_{protocol}.json"
        report = json.loads((workdir / "eval" / entry["file"]).read_text())
        assert report["step"] == entry["step"] and report["psnr"] == entry["psnr"]
        assert (workdir / "eval" / entry["file"].replace(".json", ".png")).exists()
    assert json.loads((workdir / "eval.json").read_text())["step"] == 2  # the latest


def test_a_lock_from_another_host_is_refused_unless_forced(tmp_path):
    """A lock whose holder runs elsewhere cannot be checked: refused, --force_unlock takes it."""
    from vqgan_jax import workdir as workdir_lib
    lock = tmp_path / "LOCK"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(workdir_lib.WorkdirLocked,
                       match=r"\(host elsewhere, pid 1, started then\).*--force_unlock"):
        with workdir_lib.locked(str(tmp_path)):
            pass
    with workdir_lib.locked(str(tmp_path), force=True):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_config_of_an_older_release_reads_with_the_defaults_its_code_assumed(tmp_path):
    """Fields added after the first workdirs were written (stage, arch, disc.kind, the LR
    schedule, the later loss terms, the mesh's tensor axis, sharding rules) come back from read_config as the code of that time used them,
    JSON lists as tuples; a workdir of the wrong stage is refused naming the field."""
    from conftest import load_config
    from vqgan_jax import workdir as workdir_lib
    from vqgan_jax.state import tokenizer as state1
    config = load_config("demo")
    old = config.to_dict()
    del old["stage"], old["arch"], old["disc"]["kind"], old["sharding_rules"]
    del old["mesh"]["tensor"]
    for field in ("lr_schedule", "warmup_steps", "final_lr_fraction"):
        del old["optimizer"][field]
    for field in ("ema_decay", "gen_loss", "r1_every", "lecam_ema_decay"):
        del old["loss"][field]
    workdir_lib.write_state(str(tmp_path), "--workdir", 1, {"step": np.int32(1)},
                            type(config)(old))
    read = workdir_lib.read_config(str(tmp_path), "--workdir")
    assert (read.stage, read.arch, read.disc.kind, read.loss.ema_decay) == (
        "tokenizer", "vqgan", "patchgan", 0.0)
    assert (read.optimizer.lr_schedule, read.optimizer.warmup_steps,
            read.optimizer.final_lr_fraction) == ("constant", 0, 0.0)
    assert (read.loss.gen_loss, read.loss.r1_every, read.loss.lecam_ema_decay) == ("hinge", 16,
                                                                                   0.999)
    assert (read.mesh.tensor, read.sharding_rules) == (1, ())
    assert state1.build_step_config(read).gen_loss == "hinge"  # the state builds from it
    assert read.model.ch_mult == tuple(config.model.ch_mult)
    assert read.model.to_dict() == config.model.to_dict()
    with pytest.raises(ValueError, match=r"--workdir=.* holds a 'tokenizer' run; point it at a "
                       r"stage-2 \(transformer\) workdir"):
        workdir_lib.read_config(str(tmp_path), "--workdir", stage="transformer")
    with pytest.raises(workdir_lib.WorkdirNotEmpty, match="already holds checkpoints"):
        workdir_lib.write_state(str(tmp_path), "--out", 2, {"step": np.int32(2)}, config)
