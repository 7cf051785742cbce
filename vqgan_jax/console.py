"""What the command lines print: vqgan_jax's own messages and one progress display.

- :func:`quiet_logs`: other libraries' INFO logs (orbax's checkpoint handlers and throughput,
  clu's per-step metric lines and work-unit notes, jax) are hidden on the console unless
  ``--verbosity=1`` (absl's flag) or more; vqgan_jax's INFO messages and everyone's warnings
  and errors stay. TensorBoard events and ``scalars.jsonl`` are written as before.
- :func:`bar`: a bar over evaluation and sampling batches on a terminal.
- :class:`Progress`: training progress, a live tqdm bar on a terminal (step, loss, img/s, ETA),
  else a plain log line every ``log_every_steps``.
"""

import datetime
import logging as std_logging
import os
import sys
import time
from collections.abc import Iterable
from typing import TypeVar

from absl import flags, logging

T = TypeVar("T")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoOnly(std_logging.Filter):
    """Keeps warnings and errors, and INFO (or lower) records logged from vqgan_jax's files."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


_FILTER = _OwnInfoOnly()


def quiet_logs() -> None:
    """Hide other libraries' INFO logs on the console (absl's handler, which also carries the
    standard ``logging`` records of jax and orbax), unless ``--verbosity >= 1``. Call it in a
    command line's ``main``, after absl parsed the flags; calling it again changes nothing."""
    if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1:
        return
    logging.get_absl_handler().addFilter(_FILTER)


def bar(iterable: Iterable[T], total: int, desc: str, *, process_index: int = 0,
        stream=None) -> Iterable[T]:
    """``iterable`` with a tqdm bar of ``total`` items (evaluation and sampling batches) on a
    terminal (stderr a TTY, process 0); elsewhere ``iterable`` itself, printing nothing."""
    stream = stream or sys.stderr
    if process_index != 0 or not stream.isatty():
        return iterable
    import tqdm
    return tqdm.tqdm(iterable, total=total, desc=desc, unit="batch", file=stream,
                     dynamic_ncols=True)


class Progress:
    """Training progress from step ``start`` to ``total``.

    On a terminal (stderr is a TTY, process 0): one live tqdm bar, advanced every step, its
    loss and img/s refreshed whenever metrics are logged; tqdm gives the rate and ETA.
    Elsewhere (a log file, a pipe, CI): one plain line ``step S/T: loss L, R img/s, ETA H:MM:SS``
    each time metrics are logged (every ``log_every_steps``).
    """

    def __init__(self, start: int, total: int, *, process_index: int = 0, stream=None):
        stream = stream or sys.stderr
        self._start, self._total, self._t0 = start, total, time.perf_counter()
        self._bar = None
        if process_index == 0 and stream.isatty():
            import tqdm
            self._bar = tqdm.tqdm(total=total, initial=start, unit="step", file=stream,
                                  dynamic_ncols=True, desc="train")

    def step(self) -> None:
        """One step done."""
        if self._bar is not None:
            self._bar.update(1)

    def log(self, step: int, summary: dict[str, float]) -> None:
        """Metrics were logged at ``step``: ``loss`` and ``img_per_s`` are shown."""
        loss, rate = summary.get("loss", float("nan")), summary.get("img_per_s", float("nan"))
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}, {rate:.1f} img/s")
            return
        done = step - self._start
        eta = ((self._total - step) * (time.perf_counter() - self._t0) / done) if done else 0.0
        logging.info("step %d/%d: loss %.4f, %.1f img/s, ETA %s", step, self._total, loss, rate,
                     datetime.timedelta(seconds=round(eta)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
