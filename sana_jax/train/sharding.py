"""The mesh and the logical-axis rules: the only place where parameter and batch axes meet devices.

The model names axes (`layers`, `embed`, `heads`, `mlp`, ...; sana_jax.logical_axes); these rules map them onto
a (data, fsdp, tensor) mesh. FSDP shards the `embed` axis of every weight over `fsdp`; tensor parallelism shards
heads / FFN width over `tensor`; the batch is split over (data, fsdp). Names without a rule are replicated.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sana_jax.train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


def mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if num_devices % fixed:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                         f"{num_devices} are present")
    return tuple(sizes)


def make_mesh(mesh: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(mesh: Mesh, logical_specs):
    """A tree of NamedSharding for a tree of logical PartitionSpecs (sana_jax.logical_axes)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(tree_shapes, shardings) -> None:
    """Raise before compiling if a sharded axis does not divide by its mesh size (names the leaf)."""
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(tree_shapes),
                                       jax.tree_util.tree_leaves(shardings)):
        for dim, axes in zip(shape.shape, sharding.spec):
            if axes is None:
                continue
            size = math.prod(sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                raise ValueError(f"{jax.tree_util.keystr(path)} {tuple(shape.shape)}: axis of size {dim} is "
                                 f"sharded over {axes} = {size} devices, which does not divide it")
