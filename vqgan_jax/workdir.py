"""What a workdir guarantees under faults: one writer at a time, restores that survive a damaged
checkpoint, saves that fail loudly.

- :func:`locked`: the ``LOCK`` file that ``python -m vqgan_jax.main`` holds (process 0) while it
  writes; a second job on the same workdir is refused before it compiles anything.
- :func:`restore_newest`: tries checkpoints newest first; a step folder that cannot be read
  (truncated, a missing or corrupt array file, or any file whose SHA-256 differs from the one
  recorded when the save finished: bit flips) is named in a warning and the one before it is
  used; :class:`NoIntactCheckpoint` when none can be read. Nothing is deleted.
- :class:`CheckpointManager`: orbax's, with a failed (async) save raised as :class:`SaveFailed`
  naming the step and the folder.
- :func:`save_evaluation`: every evaluation kept in ``eval/``, named by step, split and
  protocol, with an index.
"""

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

LOCK = "LOCK"                        # in the workdir: {"host", "pid", "started"} of the writer
DAMAGED = "damaged_checkpoints"      # in the workdir: step folders a training run set aside
CHECKSUMS = "checkpoint_checksums"   # in the workdir: <step>.json, SHA-256 of each file of a step
T = TypeVar("T")
_unreadable: set[str] = set()        # step folders this process failed to restore
_verified: set[str] = set()          # step folders whose checksums this process checked


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked; the message says why and what to do."""


class WorkdirLocked(WorkdirError):
    """Another process holds the workdir's lock."""


class NoIntactCheckpoint(WorkdirError):
    """Every checkpoint of a workdir failed to restore."""


class SaveFailed(WorkdirError):
    """Writing a checkpoint failed (full disk, file size limit, permissions...)."""


@contextlib.contextmanager
def exit_on_error(*also: type[Exception]) -> Iterator[None]:
    """For the command lines: a :class:`WorkdirError` (or one of the exception types ``also``)
    ends the process with ``Error: <message>`` on stderr and exit status 1, not a stack trace."""
    try:
        yield
    except (WorkdirError, *also) as e:
        sys.exit(f"Error: {e}")


# ----------------------------------------------------------------------------- one writer

@contextlib.contextmanager
def locked(workdir: str, *, force: bool = False) -> Iterator[None]:
    """Hold ``workdir/LOCK`` for the ``with`` block; released however the block ends.

    Only process 0 takes it (one lock per multi-host job). A lock whose holder ran on this
    host and is no longer alive is taken over with a warning; ``force`` takes over any lock
    (``--force_unlock``: for a holder on another host known to be gone).

    Raises:
      WorkdirLocked: naming the workdir and the holder (host, pid, start time) when another
        live process, or one on another host, holds the lock.
      ValueError: naming ``--workdir`` when the lock file cannot be written there.
    """
    if jax.process_index() > 0:
        yield
        return
    path = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _acquire(path, me, force)
    try:
        yield
    finally:
        if _read_lock(path) == me:
            path.unlink(missing_ok=True)
        else:
            logging.warning("%s was taken over by another process; left in place.", path)


def _acquire(path: epath.Path, me: dict, force: bool) -> None:
    for _ in range(2):  # a second try after removing a stale lock
        if _create_exclusive(path, json.dumps(me)):
            return
        holder = _read_lock(path)
        who = (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
               f"{holder.get('started')}" if holder else "an unreadable lock file")
        if force:
            logging.warning("--force_unlock: taking over %s (held by %s).", path, who)
        elif holder.get("host") == me["host"] and not _alive(holder.get("pid"), me["pid"]):
            logging.warning("Taking over the stale lock %s: its holder (%s) is no longer "
                            "running.", path, who)
        else:
            raise WorkdirLocked(
                f"--workdir={path.parent} is in use by another process ({who}); two jobs "
                f"writing one workdir would overwrite each other's checkpoints. Stop that job "
                f"or pass another --workdir; if it is certainly gone (e.g. its machine was "
                f"lost), rerun with --force_unlock.")
        path.unlink(missing_ok=True)
    raise WorkdirLocked(f"--workdir={path.parent}: another process took {path} at the same "
                        "time; only one may write there.")


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Write ``text`` to a new file ``path``; False if it exists (atomic on local disks)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if "://" in os.fspath(path):  # object stores: best effort, no exclusive create
            if path.exists():
                return False
            path.write_text(text)
            return True
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise ValueError(f"--workdir={path.parent} is not writable ({e}); pass a directory "
                         "you can write to.") from e
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _read_lock(path: epath.Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: Any, my_pid: int) -> bool:
    if not isinstance(pid, int) or pid == my_pid:  # my own pid: a previous life of this container
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps in ``directory``, oldest first, without those this process
    already failed to restore."""
    directory = epath.Path(directory)
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    return sorted(s for s in steps if os.fspath(directory / str(s)) not in _unreadable)


def restore_newest(directory: str | os.PathLike, restore: Callable[[int], T],
                   steps: list[int] | None = None) -> tuple[int, T]:
    """``(step, restore(step))`` for the newest of ``steps`` (default: every finished step in
    ``directory``) that restores; each one that raises is named in a warning and skipped.

    Raises:
      NoIntactCheckpoint: listing each step and its error when none restores (nothing is
        deleted). Callers check for an empty ``directory`` themselves.
    """
    directory = epath.Path(directory)
    steps = checkpoint_steps(directory) if steps is None else steps
    failures = []
    for step in sorted(steps, reverse=True):
        try:
            verify_checksums(directory, step)
            value = restore(step)
        except Exception as e:  # tensorstore, JSON and missing-file errors: all mean unreadable
            reason = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0]
            reason = f"{type(e).__name__}: {reason[:200]}"
            _unreadable.add(os.fspath(directory / str(step)))
            failures.append(f"step {step} ({reason})")
            logging.warning("Checkpoint %s is damaged or unreadable (%s); trying the one "
                            "before it.", directory / str(step), reason)
            continue
        if failures:
            logging.warning("Restored step %d of %s; newer steps could not be read: %s.", step,
                            directory, sorted(s for s in steps if s > step))
        return step, value
    raise NoIntactCheckpoint(
        f"No checkpoint in {directory} can be restored: {'; '.join(failures) or 'none given'}. "
        "Nothing was deleted. Restore the folder from a copy, or move the damaged step folders "
        "out of it to start that run afresh.")


def _manifest(directory: epath.Path, step: int) -> epath.Path:
    return directory.parent / CHECKSUMS / f"{step}.json"


def _digests(step_dir: epath.Path) -> dict[str, str]:
    """SHA-256 (hex) of every file under ``step_dir``, keyed by its relative path."""
    step_dir = pathlib.Path(os.fspath(step_dir))   # local folders only (see callers)
    def sha256(f: pathlib.Path) -> str:
        with open(f, "rb") as stream:   # streamed: array files can be gigabytes
            return hashlib.file_digest(stream, "sha256").hexdigest()
    return {os.path.relpath(f, step_dir): sha256(f)
            for f in sorted(step_dir.rglob("*")) if f.is_file()}


def record_checksums(directory: str | os.PathLike, steps: list[int]) -> None:
    """Write ``WORKDIR/checkpoint_checksums/<step>.json`` for each of the finished ``steps``
    (process 0, local workdirs; object stores keep their own checksums)."""
    directory = epath.Path(directory)
    if jax.process_index() > 0 or "://" in os.fspath(directory):
        return
    for step in steps:
        path = _manifest(directory, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, _digests(directory / str(step)))


def verify_checksums(directory: str | os.PathLike, step: int) -> None:
    """Raise if a file of checkpoint ``step`` is missing or differs from its recorded SHA-256
    (no record, e.g. a run killed before it was written: nothing to check).

    Raises:
      WorkdirError: naming the step folder and the first file that differs or is missing.
    """
    directory = epath.Path(directory)
    path = _manifest(directory, step)
    if ("://" in os.fspath(directory) or not path.exists()
            or os.fspath(directory / str(step)) in _verified):
        return
    recorded, found = json.loads(path.read_text()), _digests(directory / str(step))
    for name, digest in recorded.items():
        if found.get(name) != digest:
            what = "is missing" if name not in found else "differs from its SHA-256 at save"
            raise WorkdirError(f"{directory / str(step) / name} {what}")
    _verified.add(os.fspath(directory / str(step)))


def set_aside(directory: str | os.PathLike, steps: list[int]) -> None:
    """Move damaged step folders of ``directory`` to ``WORKDIR/damaged_checkpoints/`` (process 0;
    every process waits for it), so that training can save those steps again."""
    directory = epath.Path(directory)
    if jax.process_index() == 0:
        for step in steps:
            target = directory.parent / DAMAGED / str(step)
            target.parent.mkdir(parents=True, exist_ok=True)
            while target.exists():
                target = target.with_name(target.name + "_")
            (directory / str(step)).rename(target)
            if _manifest(directory, step).exists():   # a new save of this step gets a new one
                _manifest(directory, step).rename(target.with_name(target.name + ".sha256.json"))
            _unreadable.discard(os.fspath(directory / str(step)))  # the step may be saved anew
            logging.warning("Moved the damaged checkpoint %s to %s (kept for inspection).",
                            directory / str(step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vqgan_jax.workdir.set_aside")


class CheckpointManager(ocp.CheckpointManager):
    """orbax's CheckpointManager whose failed saves raise :class:`SaveFailed`, and whose
    finished saves leave the SHA-256 of every file they wrote (:func:`record_checksums`) for
    :func:`restore_newest` to check.

    An async save that fails in the background is reported by the next ``save`` or by
    ``wait_until_finished``; the folder it was writing stays a temporary one, which restores
    ignore, so the checkpoints before it stay the newest intact ones.

    Raises:
      SaveFailed: from ``save`` and ``wait_until_finished``, naming the step being saved, the
        folder, the underlying error and the newest finished step.
    """

    _saving: int | None = None

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # orbax waits here anyway; this names a failed previous save
        self._saving = step
        if jax.process_index() == 0:
            _manifest(epath.Path(self.directory), step).unlink(missing_ok=True)
        try:
            return super().save(step, *args, **kwargs)
        except Exception as e:
            raise self._failed(e) from e

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as e:
            raise self._failed(e) from e
        if self._saving in checkpoint_steps(self.directory):  # finished (orbax also calls this
            record_checksums(self.directory, [self._saving])  # before it starts a save)
            self._saving = None

    def _failed(self, e: Exception) -> SaveFailed:
        if isinstance(e, SaveFailed):
            return e
        steps = checkpoint_steps(self.directory)
        return SaveFailed(
            f"Saving checkpoint step {self._saving} in {self.directory} failed ({type(e).__name__}: {e}). "
            f"The run stopped; the checkpoints before it are intact (newest: "
            f"{steps[-1] if steps else 'none'}). Free disk space or fix the permissions, then "
            "rerun the same command to resume.")


# ----------------------------------------------------------------------------- evaluations

def save_evaluation(workdir: str, report: dict[str, Any], split: str) -> epath.Path:
    """Keep an evaluation report: ``WORKDIR/eval/step_<step>_<split>_<protocol>.json``
    (``protocol``: 8 hex digits of the SHA-256 of ``report["protocol"]``, so evaluations under
    different settings never overwrite each other), an entry appended to ``eval/index.json``
    (file, step, split, protocol, time and the report's numbers), and ``WORKDIR/eval.json``,
    the latest evaluation. Each file is replaced whole (written aside, then renamed).

    Returns:
      The report's path without its ``.json`` suffix (for files that go with it).

    Raises:
      OSError / ValueError: when a file cannot be written or ``eval/index.json`` is not JSON.
    """
    protocol = hashlib.sha256(json.dumps(report["protocol"], sort_keys=True,
                                         default=str).encode()).hexdigest()[:8]
    folder = epath.Path(workdir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"step_{report['step']:06d}_{split}_{protocol}"
    _replace(stem.with_name(stem.name + ".json"), report)
    index = folder / "index.json"
    entries = json.loads(index.read_text()) if index.exists() else []
    entries.append(dict(
        file=stem.name + ".json", step=report["step"], split=split, protocol=protocol,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in report.items() if isinstance(v, (int, float)) and k != "step"}))
    _replace(index, entries)
    _replace(epath.Path(workdir) / "eval.json", report)
    logging.info("Wrote %s.json (and eval.json, eval/index.json)", stem)
    return stem


def _replace(path: epath.Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
