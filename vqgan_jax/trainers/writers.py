"""clu metric writers that work with or without TensorFlow.

clu's ``metric_writers`` package imports its TensorFlow ``SummaryWriter`` at import time, so
without TensorFlow neither ``clu.metric_writers`` nor ``clu.periodic_actions`` imports. When
TensorFlow is missing we register, before clu is first imported, a ``SummaryWriter`` with the
same interface that writes the same TensorBoard event files through tensorboardX. Everything
else (``create_default_writer``, ``AsyncMultiWriter``, ``ReportProgress``) is clu's own.

Import clu's writers through this module (``from vqgan_jax.trainers.writers import
metric_writers, periodic_actions``) so the shim is in place first.
"""

import importlib.util
import json
import sys
import types
from typing import Any, Mapping

import numpy as np
from absl import logging

_SUMMARY_MODULE = "clu.metric_writers.summary_writer"


def _import_tensorboardx() -> types.ModuleType:
    """``tensorboardX``, imported without PyTorch: its writer imports torch when it can, only to
    accept torch tensors (this writer passes numpy arrays), and importing torch adds seconds
    to the start of every training job on a machine that has it. A torch already imported is
    left as it is."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class TensorboardXSummaryWriter:
    """clu ``MetricWriter`` interface over ``tensorboardX.SummaryWriter``.

    Images are NHWC (or HWC) floats in [0, 1] or uint8, as clu's writers take them.
    """

    def __init__(self, logdir: str):
        self._writer = _import_tensorboardx().SummaryWriter(logdir)

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None):
        del metadata
        for key, value in values.items():
            value = np.asarray(value)
            if value.ndim == 0:
                self._writer.add_scalar(key, value.item(), step)
            else:
                self._writer.add_histogram(key, value, step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(np.asarray(value)), step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 3:
                value = value[None]
            self._writer.add_images(key, value, step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        del step, videos  # Not used by vqgan_jax; clu's TF writer also ignores videos.

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        for key, value in audios.items():
            self._writer.add_audio(key, np.asarray(value)[0], step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None):
        del num_buckets
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()}
        self._writer.add_text("hparams", str(flat), 0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class JsonlWriter:
    """clu ``MetricWriter`` that appends every ``write_scalars`` call to a JSON Lines file.

    Each line is ``{"step": step, name: value, ...}`` with float values; a resumed run appends
    to the same file, so a step logged before a crash and again after the restart appears
    twice (with the same values: training is deterministic given the checkpoint). Other
    summaries (images, hparams, ...) are not written.
    """

    def __init__(self, path: str):
        self._path = path
        self._lines: list[str] = []

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        self._lines.append(json.dumps(row))
        self.flush()

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        if self._lines:
            text = "".join(line + "\n" for line in self._lines)
            from vqgan_jax.workdir import is_url
            if is_url(self._path):
                # Object stores (gs://) cannot append: rewrite the whole file through etils.
                from etils import epath
                path = epath.Path(self._path)
                path.write_text((path.read_text() if path.exists() else "") + text)
            else:
                with open(self._path, "a") as f:
                    f.write(text)
            self._lines = []

    def close(self):
        self.flush()


class LoggedFailures:
    """Wraps a clu ``MetricWriter``: a call that raises (a full disk, an unwritable file, an
    error from an asynchronous write surfacing later) is logged with the error and dropped, so
    that a metrics write never stops training. :class:`JsonlWriter` keeps the rows it could not
    write and writes them with the next row that succeeds."""

    def __init__(self, writer: Any, name: str):
        self._writer, self._name = writer, name

    def __getattr__(self, method: str):
        call = getattr(self._writer, method)

        def logged(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (whatever the writer raises, training goes on)
                logging.warning("Metrics writer %s: %s failed (%s: %s); training goes on.",
                                self._name, method, type(e).__name__, e)
        return logged


def _tensorflow_importable() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def _install_shim_if_no_tensorflow() -> None:
    if _SUMMARY_MODULE in sys.modules or _tensorflow_importable():
        return
    shim = types.ModuleType(_SUMMARY_MODULE)
    shim.SummaryWriter = TensorboardXSummaryWriter
    sys.modules[_SUMMARY_MODULE] = shim


_install_shim_if_no_tensorflow()

from clu import metric_writers, periodic_actions  # noqa: E402  (after the shim, on purpose)

__all__ = ["metric_writers", "periodic_actions", "JsonlWriter", "LoggedFailures",
           "TensorboardXSummaryWriter"]
