"""Device mesh, logical-axis sharding rules and global batches.

The mesh has three axes:

* ``data``: pure data parallelism; parameters are replicated over it.
* ``fsdp``: data parallelism that also shards parameters and optimizer states (ZeRO-3 style;
  XLA all-gathers a weight where it is used and reduce-scatters its gradient).
* ``tensor``: tensor (Megatron-style) parallelism; the GPT's heads, MLP and vocabulary
  dimensions can be split over it. The batch is *not* split over ``tensor``: the devices of
  one tensor group see the same rows.

Every parameter carries logical axis names (``nn.with_logical_partitioning`` in
:mod:`vqgan_jax.models`), e.g. ``("conv_h", "conv_w", "conv_in", "conv_out")`` for a conv
kernel or ``("embed", "mlp")`` for a GPT MLP kernel. The config's ``sharding_rules``, a
sequence of ``(logical_name, mesh_axis | (mesh_axes...) | None)`` pairs (flax's logical axis
rules: the first rule whose mesh axes are still free wins), turn them into a PartitionSpec per
array, e.g. with ``(("embed", "fsdp"), ("mlp", "tensor"))`` an ``("embed", "mlp")`` kernel
becomes ``P("fsdp", "tensor")``. Optimizer states mirror the parameter trees and get the same
layout. :func:`state_shardings` never produces an invalid sharding:

* a logical name without a rule (e.g. a parameter added later) is replicated;
* a dimension whose size the mesh axes' product does not divide is replicated (mesh axes are
  dropped from the end of a multi-axis entry until the rest divides);
* an array smaller than :data:`MIN_SHARD_SIZE` elements (biases, norms, scalars) stays
  replicated: splitting it saves no memory worth a collective;
* an array without logical names (BatchNorm statistics, step counters) is replicated.

Activations are constrained with ``nn.with_logical_constraint`` (``activation_batch`` ->
``("data", "fsdp")``) inside the models; those constraints act only while a step is traced
under :func:`sharding_context` (``jax.set_mesh`` + ``nn.logical_axis_rules``) and are no-ops
elsewhere (evaluation, sampling, tests that jit directly).
"""

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")        # the batch axis is split over these
MIN_SHARD_SIZE = 2 ** 12            # arrays with fewer elements stay replicated

Rules = tuple[tuple[str, Any], ...]


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
                devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes).

    One of the three sizes may be -1: it takes the devices the others leave.

    Raises:
      ValueError: naming ``config.mesh`` when the sizes do not multiply to the device count
        (raised before anything is compiled).
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: only one of data, fsdp, tensor may be -1 (got {sizes}).")
    if fill:
        rest = math.prod(v for k, v in sizes.items() if k != fill[0])
        sizes[fill[0]] = n // rest if rest > 0 and n % rest == 0 else 0
    if min(sizes.values()) < 1 or math.prod(sizes.values()) != n:
        raise ValueError(
            f"config.mesh (data={sizes['data']}, fsdp={sizes['fsdp']}, tensor={sizes['tensor']}) "
            f"does not fit the {n} available devices: data * fsdp * tensor must equal the "
            "device count; set one of them to -1 to fill the rest.")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes[k] for k in MESH_AXES), MESH_AXES,
                         axis_types=axis_types, devices=devices)


def mesh_from_config(config: Any, devices: list | None = None) -> Mesh:
    """:func:`create_mesh` from ``config.mesh``."""
    m = config.mesh
    return create_mesh(m.data, m.fsdp, m.tensor, devices=devices)


def rules_from_config(config: Any) -> Rules:
    """``config.sharding_rules`` as a tuple of ``(name, mesh_axes)`` pairs.

    Lists (configs read back from JSON) become tuples here; no rules: everything replicated.

    Raises:
      ValueError: naming ``config.sharding_rules`` for a malformed pair or an unknown mesh axis.
    """
    raw = config.sharding_rules or ()
    rules = []
    for pair in raw:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"config.sharding_rules: {pair!r} is not a (logical_name, "
                             "mesh_axis) pair.")
        name, axes = pair
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(f"config.sharding_rules: ({name!r}, {axes!r}) names mesh axis "
                                 f"{a!r}; the mesh axes are {MESH_AXES}.")
        rules.append((name, axes))
    return tuple(rules)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """The mesh and logical rules active while a step is traced (activation constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's data and fsdp axes (replicated on tensor)."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, axes: Any) -> int:
    return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def _fit(axes: Any, dim: int, mesh: Mesh) -> Any:
    """``axes`` (str, tuple or None) for a dimension of size ``dim``, trimmed from the end until
    their size divides ``dim``; None (replicated) when nothing does."""
    if axes is None:
        return None
    axes = axes if isinstance(axes, tuple) else (axes,)
    while axes and dim % _axis_size(mesh, axes):
        axes = axes[:-1]
    if not axes or _axis_size(mesh, axes) == 1:
        return None
    return axes[0] if len(axes) == 1 else axes


def mesh_spec(logical_names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules: Rules, min_size: int = MIN_SHARD_SIZE) -> P:
    """The PartitionSpec of one array with ``logical_names`` (one per dim) and ``shape``.

    Logical names map through ``rules`` (:func:`flax.linen.logical_to_mesh_axes`); names without
    a rule, dims the mesh axes do not divide, and arrays under ``min_size`` elements are
    replicated (see the module docstring).
    """
    if math.prod(shape) < min_size or not rules:
        return P()
    axes = nn.logical_to_mesh_axes(tuple(logical_names), rules)
    return P(*(_fit(a, d, mesh) for a, d in zip(axes, shape)))


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = (),
                    min_size: int = MIN_SHARD_SIZE) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs, by logical-axis rules.

    Args:
      abstract_state: a pytree whose parameter leaves may sit in ``nn.LogicallyPartitioned``
        boxes (``jax.eval_shape`` of an init that keeps them, e.g. ``init_state(...,
        boxed=True)``); optimizer states made from boxed parameters carry the same boxes.
        Leaves outside boxes are replicated, so an unboxed tree comes out fully replicated.
      mesh: from :func:`create_mesh`.
      rules: ``(logical_name, mesh_axes)`` pairs, e.g. :func:`rules_from_config`.
      min_size: arrays with fewer elements stay replicated.

    Returns:
      The same tree with boxes removed and every leaf a NamedSharding (the layout ``jax.jit``'s
      ``out_shardings`` and orbax restore targets take).
    """
    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, mesh_spec(x.names, x.value.shape, mesh, rules, min_size))
        if isinstance(x, nn.Partitioned):  # names are mesh axes already
            names = tuple(_fit(a if not isinstance(a, list) else tuple(a), d, mesh)
                          for a, d in zip(x.names, x.value.shape))
            return NamedSharding(mesh, P(*names) if math.prod(x.value.shape) >= min_size else P())
        return NamedSharding(mesh, P())
    return jax.tree.map(one, abstract_state, is_leaf=_is_box)


def unbox(tree: Any) -> Any:
    """``tree`` with every AxisMetadata box replaced by its value (no sharding constraint)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(
        x, nn.Partitioned) else (x.unbox() if _is_box(x) else x), tree, is_leaf=_is_box)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s arrays (or ShapeDtypeStructs with shardings): the
    sum over leaves of their shard shape's size (shards are even, see :func:`mesh_spec`)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard_shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shard_shape) * x.dtype.itemsize
    return total


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global jax.Array per key, batch axis over data x fsdp.

    Each process passes only its own ``B_global / process_count`` rows.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """``{key: (global_shape, dtype)}`` -> ShapeDtypeStructs laid out as :func:`global_batch`
    lays out real batches (to lower a step ahead of its first batch)."""
    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in shapes.items()}
