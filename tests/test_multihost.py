"""Two real processes on one machine (gloo CPU collectives) train the tokenizer together through
``python -m vqgan_jax.main --distributed``, found by jax.distributed from a SLURM environment."""

import json
import os
import socket
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from test_main import TINY, make_folder


def free_slurm_port() -> int:
    """A free port in the range jax's SLURM cluster derives from the job id."""
    for port in range(65535 - 2 ** 12 + 1, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.mark.start_early
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    data = make_folder(tmp_path / "images")
    workdir = tmp_path / "run"
    job_id = free_slurm_port() - (65535 - 2 ** 12 + 1)

    def launch(steps):
        procs, log_paths = [], []
        for rank in range(2):
            env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
            # No persistent compilation cache here: with it, the restarted pair timed out
            # (30 s) setting up their gloo context on the first collective; without it, both
            # finish (checked with jax 0.10.2).
            env.update(JAX_PLATFORMS="cpu", SLURM_JOB_ID=str(job_id),
                       SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(rank),
                       SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="1")
            log_paths.append(tmp_path / f"process{rank}_{steps}_steps.log")
            # Logs to files, not pipes: a pipe read after the other process's would fill (64 KB)
            # and stall the pair on its next collective. The child keeps its own descriptor.
            with open(log_paths[-1], "w") as log_file:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "vqgan_jax.main", "--distributed",
                     f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={workdir}", *TINY,
                     f"--config.dataset=folder:{data}", f"--config.num_train_steps={steps}",
                     "--config.eval_every_steps=1000",
                     # The generator-only step without attention: the smallest program that
                     # still trains, checkpoints and resumes across two processes (no cache).
                     "--config.loss.disc_start=1000", "--config.model.attn_resolutions=()"],
                    env=env, stdout=log_file, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=400)
        logs = [path.read_text() for path in log_paths]
        for rank, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"process {rank}:\n{log[-3000:]}"
        return logs

    logs = launch(3)
    for log in logs:
        assert "2 processes, 2 devices" in log
        assert "on a {'data': 2, 'fsdp': 1, 'tensor': 1} mesh" in log
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        assert manager.all_steps() == [2, 3]
    assert json.loads((workdir / "metrics.json").read_text())["step"] == 3
    rows = [json.loads(line) for line in (workdir / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # process 0 alone writes

    logs = launch(4)  # both processes restore their share of the state and of the data stream
    assert all("from step 3 to 4" in log for log in logs)
