"""What every trainer shares: sharded state creation, checkpoints, writers, config checks."""

import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from vqgan_jax import parallel
from vqgan_jax.trainers.writers import metric_writers


def create_sharded_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                         mesh: Mesh) -> tuple[Any, Any]:
    """Build ``init_fn(rng)`` directly on the mesh, never materialised on one device.

    Returns:
      ``(state, shardings)``: the state with every array laid out by
      :func:`vqgan_jax.parallel.state_shardings`, and that pytree of NamedShardings.
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = parallel.state_shardings(abstract, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    return state, shardings


def checkpoint_manager(workdir: str, *, max_to_keep: int,
                       item_names: tuple[str, ...]) -> ocp.CheckpointManager:
    """An async orbax CheckpointManager in ``workdir/checkpoints``; steps name the folders."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", item_names=item_names,
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


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying ``shardings``: the restore target that puts arrays on the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """clu writer: console logging everywhere, TensorBoard events in workdir on process 0."""
    return metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)


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
    return workdir if "://" in workdir else os.path.abspath(workdir)


def write_json(path: str, obj: dict) -> None:
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


def latest_step(workdir: str, field: str) -> int:
    """The latest checkpoint step in ``workdir/checkpoints``.

    Raises:
      ValueError: naming ``field`` (the config field or flag that gave ``workdir``) when there
        is no checkpoint there, and what to run to make one.
    """
    directory = epath.Path(workdir) / "checkpoints"
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    if not steps:
        raise ValueError(
            f"{field}={workdir!r} holds no checkpoint ({directory} has no step folder); train "
            "that stage first, e.g. `make demo` for runs/demo or `python -m vqgan_jax.main "
            f"--config=configs/<recipe>.py --workdir={workdir}`.")
    return max(steps)


def read_config(workdir: str, field: str):
    """The ml_collections config saved with the latest checkpoint of ``workdir``.

    JSON lists come back as tuples, as the recipes write them (modules need hashable fields).

    Raises:
      ValueError: as :func:`latest_step`.
    """
    import ml_collections
    step = latest_step(workdir, field)
    path = epath.Path(workdir) / "checkpoints" / str(step) / "config" / "metadata"
    as_tuples = lambda x: tuple(x) if isinstance(x, list) else x
    return ml_collections.ConfigDict(json.loads(path.read_text(), object_hook=lambda d: {
        k: as_tuples(v) for k, v in d.items()}))


def restore_subtree(workdir: str, field: str, name: str, abstract: Any) -> Any:
    """Restore only ``state.<name>`` of the latest checkpoint in ``workdir``, onto the shardings
    that ``abstract`` (ShapeDtypeStructs, see :func:`abstract_like`) carries.

    The rest of the saved state (optimizer states, a discriminator) is never read.

    Raises:
      ValueError: as :func:`latest_step`.
    """
    step = latest_step(workdir, field)
    path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    restore_args = ocp.checkpoint_utils.construct_restore_args({name: abstract})
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item={name: abstract}, restore_args=restore_args, partial_restore=True))
    return restored[name]


def absolute(workdir: str) -> str:
    """``workdir`` as an absolute path (orbax needs one); URLs (gs://...) unchanged."""
    return workdir if "://" in workdir else os.path.abspath(workdir)
