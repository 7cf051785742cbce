"""benchmarks/peer_taming.py at a tiny size (one subprocess), and the PyTorch taming loop it
times (benchmarks/taming_loop.py): its adaptive weight against full backward passes, and the
generator passes per batch (two for taming's Lightning loop, one for the lean one)."""

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from conftest import ROOT, load_config, shrink  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import taming_loop  # noqa: E402

# 32x32 images (LPIPS' minimum), ch 16 (norm_groups 8 divides it), a 2-layer PatchGAN.
TINY = ["--image_size=32", "--batch_size=2", "--config.model.ch=16",
        "--config.model.ch_mult=(1,2)", "--config.model.norm_groups=8",
        "--config.model.z_channels=8", "--config.model.embed_dim=8", "--config.model.n_embed=64",
        "--config.disc.ndf=8", "--config.disc.n_layers=2"]


def benchmark_env() -> dict[str, str]:
    """The environment for the benchmark: one CPU device (not the 8 conftest simulates) and
    unoptimised XLA code, which compiles several times faster (speed is not tested here)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(xla + ["--xla_backend_optimization_level=0"])
    return env


def test_peer_taming_times_three_loops():
    proc = subprocess.run(
        [sys.executable, "benchmarks/peer_taming.py", *TINY, "--steps=2", "--warmup=0",
         "--threads=1"], cwd=ROOT, env=benchmark_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert [line.split()[0] for line in lines[:-1]] == ["taming", "lean", "ours"]
    rate = {n: result[f"{n}_img_per_s"] for n in ("taming", "lean", "ours")}
    assert all(math.isfinite(r) and r > 0 for r in rate.values()), rate
    assert result["ratio_vs_taming"] == pytest.approx(rate["ours"] / rate["taming"])
    assert result["ratio_vs_lean"] == pytest.approx(rate["ours"] / rate["lean"])
    assert result["step_ms"]["ours"] == pytest.approx(2 / rate["ours"] * 1e3)
    assert (result["batch_size"], result["image_size"], result["steps"]) == (2, 32, 2)
    assert result["device"]["jax_devices"] == 1 and result["threads"] == 1
    # Command-line overrides win; the fields fill the rest (imagenet_f16 has 2 blocks).
    config = result["config"]
    assert (config["model.ch"], config["model.ch_mult"], config["disc.n_layers"]) == (16, [1, 2], 2)
    assert (config["model.num_res_blocks"], config["loss.perceptual_weight"]) == (1, 1.0)
    assert result["torch_version"] == torch.__version__


@pytest.mark.parametrize("reuse_xrec, generator_passes", [(False, 2), (True, 1)])
def test_taming_loop_adaptive_weight_and_generator_passes(reuse_xrec, generator_passes):
    config = shrink(load_config("imagenet_f16"))
    config.model.update(ch=16, norm_groups=8)
    config.batch_size = 2
    loop = taming_loop.TamingLoop(config, reuse_xrec=reuse_xrec)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    last = loop.model.decoder.conv_out.weight

    def last_layer_grad_norm(term: str) -> float:
        """||d term / d last|| by a full backward pass of a fresh forward."""
        loop.model.zero_grad(set_to_none=True)
        xrec, _ = loop.forward(x)
        nll = torch.mean(torch.abs(x - xrec) + taming_loop.lpips_distance(loop.lpips, x, xrec))
        (nll if term == "nll" else -torch.mean(loop.disc(xrec))).backward()
        return last.grad.double().norm().item()

    ratio = last_layer_grad_norm("nll") / (last_layer_grad_norm("gan") + 1e-4)
    expected = min(max(ratio, 0.0), 1e4) * config.loss.disc_weight
    passes = []
    loop.model.encoder.register_forward_hook(lambda *_: passes.append(1))
    before = [p.detach().clone() for p in (last, loop.disc.main[0].weight)]

    loss, d_loss, d_weight = loop.step(x)
    assert float(d_weight) == pytest.approx(expected, rel=1e-4)
    assert len(passes) == generator_passes
    assert math.isfinite(float(loss)) and math.isfinite(float(d_loss))
    after = (last, loop.disc.main[0].weight)
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after))  # both updated
