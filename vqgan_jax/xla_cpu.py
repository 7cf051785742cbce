"""XLA:CPU defaults applied when vqgan_jax is imported: convolutions on XLA's own (Eigen) kernels.

In jaxlib 0.10, XLA:CPU hands convolutions and dots to YNNPACK library fusions by default. For
the convolutions of a VQGAN training step at the sizes that fit a CPU (3x3 kernels, 32-256
channels, 16-64 pixels a side, batch 4-16), YNNPACK's kernels are the slow part, above all the
kernel gradients, which XLA rewrites as convolutions with the batch as the feature dimension.
Keeping YNNPACK for dots only (``--xla_cpu_experimental_ynn_fusion_type=individual_dot``) puts
the convolutions back on XLA's Eigen kernels: measured side by side on 2 cores (BENCHMARKS.md),
the demo's step 802 -> 458 ms and the peer benchmark's full step 1,560 -> 1,174 ms. Results
change only by float32 rounding (tests/test_xla_cpu.py compares the loss and gradients of the
two programs).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so the flag is appended to the
environment at import, before any computation (and is inherited by subprocesses). It is not
added when:

- ``XLA_FLAGS`` already names ``xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins);
- ``VQGAN_JAX_XLA_CPU_DEFAULTS=0`` is set (XLA's own defaults);
- the installed jaxlib does not define the flag (XLA stops on flags it does not know);
- a JAX backend has already started in this process (too late to take effect; logged).

The flag touches only XLA:CPU: on GPU and TPU hosts it changes nothing on the accelerator.
"""

import os
import pathlib

FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
OPT_OUT = "VQGAN_JAX_XLA_CPU_DEFAULTS"
_NAME = b"xla_cpu_experimental_ynn_fusion_type"


def jaxlib_defines_flag() -> bool:
    """Whether the installed jaxlib registers ``xla_cpu_experimental_ynn_fusion_type``: its
    name is in one of jaxlib's compiled libraries (found without starting a backend)."""
    import mmap
    try:
        import jaxlib
    except ImportError:
        return False
    for path in pathlib.Path(jaxlib.__file__).parent.glob("*.so"):
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(_NAME) >= 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def add_xla_flag(flag: str) -> bool:
    """Appends ``flag`` (``--name=value``) to ``os.environ["XLA_FLAGS"]`` unless XLA_FLAGS
    already names it (a value set there wins). Takes effect only if no JAX backend has started
    in this process yet: XLA reads XLA_FLAGS once. Returns whether it was appended."""
    current = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0].lstrip("-") in current:
        return False
    os.environ["XLA_FLAGS"] = " ".join([current.strip(), flag]).strip()
    return True


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    return xla_bridge.backends_are_initialized()


def apply_defaults() -> str | None:
    """Appends :data:`FLAG` to ``os.environ["XLA_FLAGS"]`` unless one of the module docstring's
    exceptions holds. Returns the flag when it was added (or was already added), else None."""
    current = os.environ.get("XLA_FLAGS", "")
    if FLAG in current.split():
        return FLAG
    if os.environ.get(OPT_OUT, "1") == "0" or _NAME.decode() in current:
        return None
    if _backend_started():
        import logging
        logging.getLogger(__name__).info(
            "vqgan_jax imported after a JAX backend started: %s not applied (XLA reads "
            "XLA_FLAGS once); import vqgan_jax first, or set it in XLA_FLAGS yourself.", FLAG)
        return None
    if not jaxlib_defines_flag():
        return None
    add_xla_flag(FLAG)
    return FLAG
