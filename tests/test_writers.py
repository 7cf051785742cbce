"""The TensorBoard writer used when TensorFlow is missing (vqgan_jax.trainers.writers)."""

import subprocess
import sys
import textwrap


def test_tensorboardx_writer_writes_events_without_importing_torch(tmp_path):
    """A fresh interpreter (as a training job starts): the writer writes an event file, leaves
    torch unimported (it would add seconds to every job's start), and torch still imports
    afterwards."""
    script = textwrap.dedent(f"""
        import sys, pathlib
        import numpy as np
        from vqgan_jax.trainers.writers import TensorboardXSummaryWriter
        writer = TensorboardXSummaryWriter({str(tmp_path)!r})
        writer.write_scalars(1, {{"train/loss": 0.5}})
        writer.write_images(1, {{"reconstructions": np.zeros((1, 4, 4, 3), np.uint8)}})
        writer.flush()
        assert "torch" not in sys.modules, "the writer imported torch"
        events = list(pathlib.Path({str(tmp_path)!r}).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0, events
        import torch  # the blocked import is not left behind
        print("ok", torch.__version__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
