"""launch/tpu_pod.sh and launch/slurm_gpu.sh in dry-run mode: the commands they would run."""

import os
import shlex
import subprocess

import pytest

from conftest import ROOT, load_config


def dry_run(**env):
    env = dict(os.environ, TPU="pod", ZONE="us-central2-b", BUCKET="bkt",
               REPO="https://example.invalid/vqgan_jax.git", DRY_RUN="1", **env)
    out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh")], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


def test_tpu_pod_script_runs_main_on_every_worker_with_valid_flags():
    create, setup, train = dry_run(BATCH_SIZE="512", FSDP="4",
                                   EXTRA="--config.num_train_steps=1000")
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    for cmd in (setup, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
        assert "--worker=all" in cmd
    remote = shlex.split(next(a for a in train if a.startswith("--command=")).split("=", 1)[1])
    assert remote[:6] == ["cd", "vqgan_jax", "&&", "python3", "-m", "vqgan_jax.main"]
    flags = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), True)
                 for a in remote[6:])
    assert flags.pop("distributed") is True
    assert flags.pop("workdir") == "gs://bkt/runs/imagenet_f16"
    assert (ROOT / flags.pop("config")).is_file()
    config = load_config("imagenet_f16")
    expected = {"config.data_dir": "gs://bkt/tensorflow_datasets", "config.batch_size": "512",
                "config.mesh.fsdp": "4", "config.num_train_steps": "1000"}
    assert flags == expected
    for name in expected:  # every override names a real config field
        node = config
        for part in name.split(".")[1:]:
            assert part in node, name
            node = node[part]


def test_tpu_pod_script_requires_its_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU", "ZONE", "BUCKET")}
    result = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh")], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "TPU" in result.stderr


def slurm_dry_run(**env):
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
               DRY_RUN="1", **env)
    out = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sh")], env=env, check=True,
                         capture_output=True, text=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


@pytest.mark.parametrize("config_name", ["imagenet_f16", "imagenet_cond_transformer"])
def test_slurm_script_runs_main_once_per_gpu_with_valid_flags(config_name):
    (cmd,) = slurm_dry_run(CONFIG=f"configs/{config_name}.py", WORKDIR="/shared/runs/x",
                           BATCH_SIZE="512", FSDP="8", TENSOR="2", DATA_DIR="/shared/tfds",
                           EXTRA="--config.num_train_steps=1000 --config.log_every_steps=10")
    assert cmd[0] == "srun" and "--gpus-per-task=1" in cmd
    main = cmd.index("vqgan_jax.main")
    assert cmd[main - 1] == "-m"
    flags = dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), True)
                 for a in cmd[main + 1:])
    assert flags.pop("distributed") is True
    assert flags.pop("workdir") == "/shared/runs/x"
    assert (ROOT / flags.pop("config")).is_file()
    assert flags == {"config.batch_size": "512", "config.mesh.fsdp": "8",
                     "config.mesh.tensor": "2", "config.dtype": "bfloat16",
                     "config.model.remat": "False", "config.data_dir": "/shared/tfds",
                     "config.num_train_steps": "1000", "config.log_every_steps": "10"}
    config = load_config(config_name)
    for name in flags:  # every override names a real config field
        node = config
        for part in name.split(".")[1:]:
            assert part in node, name
            node = node[part]
