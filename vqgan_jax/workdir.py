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

It is also the only code that knows a workdir's layout (``checkpoints/<step>/{state, data,
config}``): :class:`RunCheckpoints` (training), :func:`read_config` (older configs upgraded by
:func:`upgrade_config`), :func:`restore_subtrees` (onto a mesh), :func:`write_state` (interop).
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
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vqgan_jax import parallel
from vqgan_jax.models import registry

LOCK = "LOCK"                        # in the workdir: {"host", "pid", "started"} of the writer
DAMAGED = "damaged_checkpoints"      # in the workdir: step folders a training run set aside
CHECKSUMS = "checkpoint_checksums"   # in the workdir: <step>.json, SHA-256 of each file of a step
T = TypeVar("T")
# config.stage -> its stage number: 1 makes codes, 2 generates them (GPT or MaskGIT).
STAGE_NUMBERS = {"tokenizer": 1, "transformer": 2, "maskgit": 2}
_unreadable: set[str] = set()        # step folders this process failed to restore
_verified: set[str] = set()          # step folders whose checksums this process checked


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked; the message says why and what to do."""


class WorkdirLocked(WorkdirError):
    """Another process holds the workdir's lock."""


class NoIntactCheckpoint(WorkdirError):
    """Every checkpoint of a workdir failed to restore."""


class WorkdirNotEmpty(WorkdirError, ValueError):
    """A workdir that must be new already holds checkpoints."""


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
    path = epath.Path(absolute(workdir)) / LOCK
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
        if is_url(path):  # object stores: best effort, no exclusive create
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
    if jax.process_index() > 0 or is_url(directory):
        return
    for step in steps:
        path = _manifest(directory, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, _digests(directory / str(step)))


def verify_checksums(directory: str | os.PathLike, step: int) -> None:
    """Raise if a file of checkpoint ``step`` is missing or differs from its recorded SHA-256
    (no record, e.g. a run killed before it was written: nothing to check).

    Raises:
      WorkdirError: naming the step folder and the first file that differs or is missing.
    """
    directory = epath.Path(directory)
    path = _manifest(directory, step)
    if (is_url(directory) or not path.exists()
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
    write_json(stem.with_name(stem.name + ".json"), report)
    index = folder / "index.json"
    entries = json.loads(index.read_text()) if index.exists() else []
    entries.append(dict(
        file=stem.name + ".json", step=report["step"], split=split, protocol=protocol,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in report.items() if isinstance(v, (int, float)) and k != "step"}))
    write_json(index, entries)
    write_json(epath.Path(workdir) / "eval.json", report)
    logging.info("Wrote %s.json (and eval.json, eval/index.json)", stem)
    return stem


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (local or gs:// paths), replacing any previous file whole."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
    logging.info("Wrote %s", path)


def write_png(path: str, image) -> None:
    """Write a uint8[H, W, 3] array as PNG (local or gs:// paths)."""
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    epath.Path(path).write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------- the layout

def is_url(path: str | os.PathLike) -> bool:
    """True for object-store paths (``gs://...``): no local file semantics (locks, checksums)."""
    return "://" in os.fspath(path)


def absolute(workdir: str) -> str:
    """``workdir`` as an absolute path (orbax needs one); URLs (gs://...) unchanged."""
    return workdir if is_url(workdir) else os.path.abspath(workdir)


def ensure_writable_workdir(workdir: str) -> str:
    """Create ``workdir`` (local or gs://) and check that a file can be written in it.

    Returns:
      The workdir as an absolute path (orbax needs one) or the URL unchanged.

    Raises:
      ValueError: naming ``--workdir`` when it cannot be created or written.
    """
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--workdir={workdir} is not writable ({e}); pass a directory you "
                         "can write to.") from e
    return absolute(workdir)


def checkpoint_manager(workdir: str, *, max_to_keep: int,
                       item_names: tuple[str, ...]) -> ocp.CheckpointManager:
    """An async orbax CheckpointManager in ``workdir/checkpoints``; steps name the folders. A
    failed save raises :class:`SaveFailed` (at the next save or wait)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=True, create=True)
    return CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=item_names,
                             options=options)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  train_iter: Any) -> Any:
    """Restore ``state`` of checkpoint ``step`` onto the shardings ``abstract_state`` carries,
    and the data iterator ``train_iter`` in place when the checkpoint has a ``data`` item.

    Checkpoints converted from other projects (:mod:`vqgan_jax.interop`) have none: the data
    iterator then starts from its beginning.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if (epath.Path(manager.directory) / str(step) / "data").exists():
        import grain  # Only the training job needs the data loader's checkpointing.
        items["data"] = grain.checkpoint.CheckpointRestore(train_iter)
    else:
        logging.warning("Checkpoint %d has no data iterator state; the data starts afresh.", step)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


class RunCheckpoints:
    """A training run's orbax checkpoints in ``workdir/checkpoints``: the state, the data
    iterator's position and the config, saved together (async) and restored together.

    Attributes:
      manager: the :class:`orbax.checkpoint.CheckpointManager` (``wait_until_finished`` and
        ``close`` it when the run ends).
    """

    def __init__(self, workdir: str, config: Any, train_iter: Any):
        self.manager = checkpoint_manager(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                          item_names=("state", "data", "config"))
        self._train_iter = train_iter
        self._config = config.to_dict()

    def restore_latest(self, abstract: Any, shardings: Any, init: Callable[[], Any]) -> Any:
        """The state from the newest intact checkpoint, restored onto ``abstract`` (its
        ShapeDtypeStructs, or arrays of those shapes) laid out by ``shardings`` (the data
        iterator is restored in place); ``init()``, the fresh state, when there is none. Newer
        damaged checkpoints are named in a warning and moved to
        ``WORKDIR/damaged_checkpoints/``.

        Raises:
          NoIntactCheckpoint: when no checkpoint restores (none is moved).
        """
        steps = self.manager.all_steps()
        if not steps:
            return init()
        target = abstract_like(abstract, shardings)
        step, state = restore_newest(
            self.manager.directory,
            lambda s: restore_state(self.manager, s, target, self._train_iter), steps)
        if damaged := [s for s in steps if s > step]:
            set_aside(self.manager.directory, damaged)
            self.manager.reload()
        logging.info("Resumed from %s at step %d", self.manager.directory, step)
        return state

    def save(self, state: Any, step: int, force: bool = False) -> None:
        """Save ``state``, the data iterator and the config as checkpoint ``step`` (async)."""
        import grain  # Only the training job needs the data loader's checkpointing.
        self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(self._train_iter),
            config=ocp.args.JsonSave(self._config)))


def write_state(workdir: str, field: str, step: int, state: Any,
                config: ml_collections.ConfigDict) -> None:
    """A new workdir's one checkpoint ``step`` of converted weights (:mod:`vqgan_jax.interop`):
    ``state`` and ``config`` (JSON), no ``data`` (resuming starts the data iterator afresh).

    Raises:
      WorkdirNotEmpty: naming ``field`` when ``workdir`` already holds checkpoints.
      SaveFailed: when the save fails.
    """
    if checkpoint_steps(epath.Path(workdir) / "checkpoints"):
        raise WorkdirNotEmpty(f"{field}={workdir!r} already holds checkpoints; pass an empty "
                              "or new directory.")
    manager = checkpoint_manager(workdir, max_to_keep=1, item_names=("state", "config"))
    try:
        manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())))
        manager.wait_until_finished()
    finally:
        manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying ``shardings``: the restore target that puts arrays on the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def latest_step(workdir: str, field: str) -> int:
    """The latest checkpoint step of ``workdir`` (skipping any this process found damaged).

    Raises:
      ValueError: naming ``field`` (the flag or config field that gave ``workdir``) when it
        holds no checkpoint, and what to run to make one.
    """
    return max(_steps_to_try(workdir, field, None))


def _steps_to_try(workdir: str, field: str, step: int | None) -> list[int]:
    """Every finished step of ``workdir`` (the newest intact one is used), or ``[step]``.

    Raises:
      ValueError: naming ``field`` when there is no checkpoint, or ``step`` (``--step`` when
        ``field`` is a flag) when there is none at that step.
    """
    directory = epath.Path(workdir) / "checkpoints"
    steps = checkpoint_steps(directory)
    if not steps:
        raise ValueError(
            f"{field}={workdir!r} holds no checkpoint (no checkpoints/<step> folder in it); "
            "train that stage first, e.g. `make demo` for runs/demo or `python -m "
            f"vqgan_jax.main --config=configs/<recipe>.py --workdir={workdir}`.")
    if step is not None and step not in steps:
        flag = "--step" if field.startswith("--") else "step"
        raise ValueError(f"{flag}={step}: no checkpoint at that step (it has {steps}) in "
                         f"{field}={workdir!r}; pass one of them, or none for the newest.")
    return steps if step is None else [step]


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config (JSON) with the fields that older releases did not write filled in with
    the values their code assumed: the one place that knows older workdirs. JSON lists become
    tuples, as the recipes write them (modules need hashable fields)."""
    as_tuples = lambda x: tuple(as_tuples(v) for v in x) if isinstance(x, list) else (
        {k: as_tuples(v) for k, v in x.items()} if isinstance(x, dict) else x)
    config = {"stage": "tokenizer", "data_dir": None, "sharding_rules": (), **as_tuples(config)}
    config["mesh"] = {"tensor": 1, **config["mesh"]}
    if config["stage"] == "tokenizer":
        config.setdefault("arch", "vqgan")
        config["disc"] = {"kind": "patchgan", **config["disc"]}
        config["optimizer"] = {"lr_schedule": "constant", "warmup_steps": 0,
                               "final_lr_fraction": 0.0, **config["optimizer"]}
        config["loss"] = {"gen_loss": "hinge", "adaptive_disc_weight": True, "l1_weight": 1.0,
                          "l2_weight": 0.0, "logit_laplace_weight": 0.0, "r1_weight": 0.0,
                          "r1_every": 16, "lecam_weight": 0.0, "lecam_ema_decay": 0.999,
                          "ema_decay": 0.0, **config["loss"]}
    return config


def read_config(workdir: str, field: str, step: int | None = None,
                stage: str | None = None) -> ml_collections.ConfigDict:
    """The ml_collections config saved with the latest readable checkpoint of ``workdir`` (or
    with checkpoint ``step``), upgraded by :func:`upgrade_config`.

    Args:
      stage: when given, the ``config.stage`` the workdir must hold (a key of
        :data:`STAGE_NUMBERS`: "tokenizer", "transformer" or "maskgit").

    Raises:
      ValueError: as :func:`latest_step`; naming ``step`` when there is no such checkpoint;
        naming ``field`` when the workdir holds another ``stage``.
      NoIntactCheckpoint: when no checkpoint's config can be read.
    """
    steps = _steps_to_try(workdir, field, step)
    directory = epath.Path(workdir) / "checkpoints"
    _, config = restore_newest(directory, lambda step: json.loads(
        (directory / str(step) / "config" / "metadata").read_text()), steps)
    config = ml_collections.ConfigDict(upgrade_config(config))
    if stage is not None and config.stage != stage:
        number = STAGE_NUMBERS[stage]
        other = (f" ({config.stage!r} and {stage!r} are both stage-2 kinds, each trained, loaded "
                 "and sampled by its own code)"
                 if STAGE_NUMBERS.get(config.stage) == number == 2 else "")
        raise ValueError(f"{field}={workdir!r} holds a {config.stage!r} run; point it at a "
                         f"stage-{number} ({stage}) workdir{other}.")
    return config


def restore_subtree(workdir: str, field: str, name: str, abstract: Any,
                    step: int | None = None) -> Any:
    """Only ``state.<name>`` of the newest intact checkpoint (or ``step``) onto the shardings
    of ``abstract`` (ShapeDtypeStructs, :func:`abstract_like`); raises as :func:`restore_subtrees`.
    """
    return restore_subtrees(workdir, field, {name: abstract}, step)[1][name]


def restore_subtrees(workdir: str, field: str, abstract: dict[str, Any],
                     step: int | None = None) -> tuple[int, dict]:
    """Restore ``{name: state.<name>}`` for the names of ``abstract``, all from one checkpoint:
    the newest that restores (damaged newer ones are named in a warning), or ``step``. The rest
    of the saved state (optimizer states, a discriminator) is never read.

    Returns:
      ``(step, restored)``.

    Raises:
      ValueError: as :func:`read_config`.
      NoIntactCheckpoint: when no checkpoint restores.
    """
    steps = _steps_to_try(workdir, field, step)
    directory = epath.Path(workdir) / "checkpoints"
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)

    def restore(step):
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(directory / str(step) / "state",
                                        args=ocp.args.PyTreeRestore(item=abstract,
                                                                    restore_args=restore_args,
                                                                    partial_restore=True))
    return restore_newest(directory, restore, steps)


# ----------------------------------------------------------------------------- tokenizer weights

def param_shardings(vq: registry.Tokenizer, mesh, rules: parallel.Rules = ()) -> tuple[Any, Any]:
    """``(abstract params, NamedShardings)`` of ``vq``'s parameters on ``mesh`` (nothing made)."""
    size = vq.resolution
    x = jax.ShapeDtypeStruct((1, size, size, 3), jax.numpy.float32)
    boxed = jax.eval_shape(lambda x: vq.init(jax.random.key(0), x)["params"], x)
    return parallel.unbox(boxed), parallel.state_shardings(boxed, mesh, rules)


def restore_eval_params(workdir: str, field: str, config: ml_collections.ConfigDict,
                        vq: registry.Tokenizer, mesh, rules: parallel.Rules = (),
                        step: int | None = None) -> tuple[Any, Any]:
    """The generator weights to evaluate and sample with (the EMA when the run kept one,
    :func:`vqgan_jax.models.registry.eval_params_field`), read alone (orbax partial restore)
    from the newest intact checkpoint of the stage-1 ``workdir`` (or checkpoint ``step``),
    laid out on ``mesh`` by ``rules`` (:func:`vqgan_jax.parallel.state_shardings`).

    Args:
      config: the workdir's saved config; vq: its model.

    Returns:
      ``(params, shardings)``.

    Raises:
      ValueError / NoIntactCheckpoint: as :func:`restore_subtree`, naming ``field``.
    """
    abstract, shardings = param_shardings(vq, mesh, rules)
    params = restore_subtree(absolute(workdir), field, registry.eval_params_field(config),
                             abstract_like(abstract, shardings), step)
    return params, shardings


def restore_tokenizer(workdir: str, step: int | None, mesh
                      ) -> tuple[ml_collections.ConfigDict, Any, int]:
    """The training config, tokenizer weights (as :func:`restore_eval_params`, replicated on
    ``mesh``) and step of the stage-1 ``workdir`` (its newest intact checkpoint, or ``step``).

    Raises:
      ValueError: naming ``--workdir`` (no checkpoint, not a stage-1 workdir) or ``--step``.
      NoIntactCheckpoint: when no checkpoint restores.
    """
    config = read_config(workdir, "--workdir", step, stage="tokenizer")
    abstract, shardings = param_shardings(registry.build_models(config)[0], mesh)  # replicated
    name = registry.eval_params_field(config)
    step, params = restore_subtrees(absolute(workdir), "--workdir",
                                    {name: abstract_like(abstract, shardings)}, step)
    return config, params[name], step
