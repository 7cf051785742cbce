"""vqgan_jax/xla_cpu.py: the XLA:CPU flag applied at import (and when it is not), and the
step's loss and gradients with it vs XLA's defaults, in two processes (XLA reads XLA_FLAGS once)."""

import os
import subprocess
import sys

import numpy as np

from conftest import ROOT
from vqgan_jax import xla_cpu

TESTS = ROOT / "tests"


def xla_flags_after_import(**env) -> str:
    """XLA_FLAGS as a fresh process sees them after ``import vqgan_jax``."""
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", "import os, vqgan_jax; "
                          "print(os.environ.get('XLA_FLAGS', ''))"],
                         env=full, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_flag_applied_at_import_unless_the_user_chose():
    assert xla_cpu.jaxlib_defines_flag()  # jaxlib 0.10.x defines it; the test pins what we use
    assert xla_flags_after_import().split() == [xla_cpu.FLAG]
    assert xla_flags_after_import(XLA_FLAGS="--xla_backend_optimization_level=0").split() == [
        "--xla_backend_optimization_level=0", xla_cpu.FLAG]
    # The user's own value wins; the opt-out leaves XLA's defaults.
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
    assert xla_flags_after_import(XLA_FLAGS=mine) == mine
    assert xla_flags_after_import(**{xla_cpu.OPT_OUT: "0"}) == ""


# One full training step's inputs at the tests' tiny size (discriminator on from step 0), its
# loss, code indices and every generator and discriminator gradient, saved to argv[1].
STEP = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from test_train_step import tiny_setup
from vqgan_jax.trainers import tokenizer as T
config, sc, mesh, state, shardings, batch = tiny_setup(disc_start=0)
g, d, _, metrics, _ = jax.jit(lambda s, b: T.compute_grads(s, b, None, sc))(state, batch)
idx = jax.jit(lambda p, x: sc.vq.apply({{"params": p}}, x, method="encode_to_indices"))(
    state.g_params, batch["image"])
leaves = {{f"g{{i}}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(g))}}
leaves.update({{f"d{{i}}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(d))}})
np.savez(sys.argv[1], loss=np.asarray(metrics["loss"]), indices=np.asarray(idx), **leaves)
print(__import__("os").environ.get("XLA_FLAGS", ""))
"""


def run_step(path, **env):
    full = {k: v for k, v in os.environ.items() if k != xla_cpu.OPT_OUT}
    # This process's XLA_FLAGS (conftest's, plus the flag its import of vqgan_jax added), less
    # the flag: the subprocess's own import decides.
    full["XLA_FLAGS"] = " ".join(f for f in full.get("XLA_FLAGS", "").split() if f != xla_cpu.FLAG)
    full.update(env, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", STEP.format(tests=str(TESTS)), str(path)],
                            env=full, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip(), dict(np.load(path))


def test_step_with_the_flag_equals_xla_defaults_to_float32_rounding(tmp_path):
    flags_on, on = run_step(tmp_path / "on.npz")
    flags_off, off = run_step(tmp_path / "off.npz", **{xla_cpu.OPT_OUT: "0"})
    assert xla_cpu.FLAG in flags_on.split() and xla_cpu.FLAG not in flags_off.split()
    # The same codes: the nearest-code search is far from a tie at this seed (a flipped code
    # would change the codebook's gradient by O(1), not by rounding).
    np.testing.assert_array_equal(on["indices"], off["indices"])
    # The two programs differ only in which kernels compute the convolutions: each output's
    # float32 sum of K products is off by at most K * eps times the sum of its terms' magnitudes
    # (worst case, any summation order). The largest reduction at this size is a kernel
    # gradient, K = batch x height x width = 8 * 32 * 32; the errors pass through at most L = 40
    # convolutions, forward and backward (encoder, decoder, discriminator): 2 * L * K * eps =
    # 0.078 relative. The terms summed into a parameter's gradient are bounded by the gradients
    # flowing through the model, so each leaf is compared at that bound times its model's whole
    # gradient norm (a leaf that cancels to ~0, a bias before a GroupNorm, is rounding noise
    # relative to itself), the loss relative to itself. Measured: ~2e-6 of the norm. A change of
    # what is computed moves the gradients by O(1).
    bound = 2 * 40 * 8 * 32 * 32 * np.finfo(np.float32).eps
    assert abs(float(on["loss"]) - float(off["loss"])) <= bound * abs(float(off["loss"]))
    assert set(on) == set(off) and len(on) > 20
    for model in "gd":
        names = [n for n in on if n[0] == model and n[1:].isdigit()]
        total = np.sqrt(sum(np.sum(off[n].astype(np.float64) ** 2) for n in names))
        assert total > 0 and names, model
        worst = max(np.linalg.norm(on[n].astype(np.float64) - off[n]) for n in names) / total
        assert worst <= bound, (model, worst)
        print(f"{model}: {len(names)} leaves, largest difference {worst:.2e} of the norm")
