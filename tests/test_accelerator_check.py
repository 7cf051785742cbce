"""benchmarks/accelerator_check.sh at tiny sizes on one CPU device: every part gives numbers."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.start_early
def test_accelerator_check_tiny_writes_every_part(tmp_path):
    out = tmp_path / "check.json"
    # One CPU device: conftest's eight simulated devices are set in this process only, and no
    # device-count flag may come in through the environment.
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "CUDA_VISIBLE_DEVICES")}
    env.update(TINY="1", JAX_PLATFORMS="cpu", PYTHON=sys.executable, TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "accelerator_check.sh"), str(out)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=170)
    log = out.with_suffix(".log")
    detail = result.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    assert result.returncode == 0, detail
    check = json.loads(out.read_text())

    env_info = check["env"]
    assert env_info["tiny"] is True and env_info["device_count"] == 1, env_info
    assert env_info["jax"] and env_info["jaxlib"] and env_info["device_kind"]

    train = check["train_step"]
    assert set(train) == {"b1"}, train  # TINY: one batch, 1 image per device
    assert train["b1"]["img_per_s"] > 0, detail
    assert train["b1"]["batch_size"] == 1 and train["b1"]["dtype"] == "bfloat16"
    assert train["b1"]["memory"]["argument_bytes"] > 0
    # FLOPs of the traced step (MFU's numerator; XLA:GPU's compiled count misses cuDNN's
    # convolutions): on a CPU within a few percent of the compiled program's count.
    assert train["b1"]["flops_source"] == "traced"
    assert train["b1"]["tflop_per_image"] == pytest.approx(
        train["b1"]["compiled_tflop_per_image"], rel=0.1)
    assert train["b1"]["wall_s"] > 0

    peer = check["peer_taming"]
    assert set(peer) == {"bfloat16"}, peer  # TINY: the bfloat16 run only
    entry = peer["bfloat16"]
    assert "error" not in entry, entry
    for loop in ("taming", "lean", "ours"):
        assert entry[f"{loop}_img_per_s"] > 0, entry
    assert entry["ratio_vs_taming"] > 0 and entry["ratio_vs_lean"] > 0
    assert entry["torch_dtype"] == "bfloat16" and entry["jax_dtype"] == "bfloat16"

    sample = check["sample"]
    assert sample["img_per_s"]["b2"] > 0, sample  # TINY: batch 2
    assert set(sample["codes_per_s"]) == {"cache_b2"}  # the cached sampler alone

    summary = check["summary"]
    assert summary["train_img_per_s"]["b1"] > 0
    assert set(summary["targets"]) == {"train_step_mfu_ge_0.5", "peer_ratio_vs_taming_ge_2",
                                       "sample_img_per_s_ge_100"}
    assert summary["targets"]["train_step_mfu_ge_0.5"] is None  # no peak known for a CPU
    assert set(check["wall_s"]) >= {"setup", "train_step.b1", "peer_taming.bfloat16", "sample"}
    assert check["total_wall_s"] > 0
