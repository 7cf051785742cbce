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
