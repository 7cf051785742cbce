"""Device mesh, parameter shardings and global batches.

The mesh has two axes, ``data`` and ``fsdp``. The batch is split over both (every device sees
different rows); parameters and optimizer states are sharded over ``fsdp`` (ZeRO-3 style: each
array split along its largest dimension that the fsdp size divides) and replicated over
``data``. With ``fsdp=1`` this is plain data parallelism.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all devices of all processes).

    One of ``data`` / ``fsdp`` may be -1: it takes the devices the other leaves.

    Raises:
      ValueError: naming ``config.mesh`` when the axis sizes do not multiply to the device count.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh.data and config.mesh.fsdp cannot both be -1.")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(
            f"config.mesh (data={data}, fsdp={fsdp}) does not fit the {n} available devices: "
            "data * fsdp must equal the device count; set one of them to -1 to fill the rest.")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=axis_types,
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 12) -> P:
    """PartitionSpec sharding the largest dimension divisible by ``fsdp_size`` over 'fsdp'.

    Arrays smaller than ``min_size`` elements (biases, norms, scalars) stay replicated: splitting
    them saves no memory worth a collective.
    """
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs, by :func:`fsdp_spec`."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size)),
                        abstract_state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global jax.Array per key, batch axis over all devices.

    Each process passes only its own ``B_global / process_count`` rows.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
