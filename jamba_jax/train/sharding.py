"""Device mesh and the logical -> mesh axis mapping.

Model code names logical axes only (``embed``, ``mlp``, ``ssm_inner``, ...: see
`jamba_jax.layers.common`). The training config's ``logical_axis_rules`` table maps each to mesh axes
of the mesh ``(data, fsdp, tensor, expert)``; this module turns those names into ``NamedSharding``s for
the whole train state (weights and optimizer moments share their weight's sharding) and for batches.

A weight dimension that its mesh axes do not divide is left replicated on that dimension (the byte
vocabulary of 257 over ``tensor=2``, say), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jamba_jax.layers import common
from jamba_jax.train.config import MESH_AXES, MeshConfig

log = logging.getLogger("jamba_jax.train")

Rules = Mapping[str, tuple[str, ...] | None]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """``jax.make_mesh`` over all devices (every host's), axes ``(data, fsdp, tensor, expert)``.

    Auto axis types: shardings are given at the jit boundary and XLA's partitioner places the rest.
    """
    return jax.make_mesh(mesh_cfg.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh,
                    *, dropped: list | None = None, what: str = "") -> P:
    """``PartitionSpec`` for an array of ``shape`` whose dimensions carry logical ``names``."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical axis names {tuple(names)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical_axis_rules: no rule for the logical axis {name!r} (of {what}); "
                             f"add `logical_axis_rules.{name}=null` or a mesh axis")
        axes = tuple(a for a in (rules[name] or ()) if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            if dropped is not None:
                dropped.append(f"{what} {name}={dim} not divisible by {'*'.join(axes)}")
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def activation_sharding(mesh: Mesh, rules: Rules):
    """Context for tracing a model under ``mesh``: layers that ask where an activation lies
    (`jamba_jax.layers.common.logical_sharding`) get ``rules``' placement; nothing to do on one device."""
    if mesh.size == 1:
        return contextlib.nullcontext()
    return common.activation_sharding(
        lambda names, shape: NamedSharding(mesh, logical_to_spec(names, shape, rules, mesh, what="activation")))


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
    """A ``NamedSharding`` for every array of ``abstract_state``, in the same tree structure.

    Variables (``nnx.Param`` and the optimizer moments that mirror them, which keep the weight's
    metadata) are sharded by their ``out_sharding`` logical names; anything else (step counters,
    optimizer counts) is replicated.
    """
    dropped: list[str] = []

    def one(path, leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            names = leaf.get_metadata().get("out_sharding")
            if names is None:
                spec = P()
            else:
                spec = logical_to_spec(names, value.shape, rules, mesh, dropped=dropped, what=_path_str(path))
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    out = jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if dropped:
        unique = sorted(set(d.split(" ", 1)[1] for d in dropped))
        log.info("left replicated (mesh axis does not divide the dimension): %s", "; ".join(unique))
    return out


def batch_axes(rules: Rules) -> tuple[str, ...]:
    return tuple(rules.get("batch") or ())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2, *, leading: int = 0) -> NamedSharding:
    """Sharding of a ``(batch, length, ...)`` array; ``leading`` unsharded axes before the batch axis."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, P(*([None] * leading), axes or None, *([None] * (ndim - leading - 1))))


def process_batch_shard(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(index, count)``: which of ``count`` equal parts of the global batch this process feeds.

    Processes whose devices hold the same rows (replicas along ``tensor``) get the same index, so
    each should read the same data; ``jax.make_array_from_process_local_data`` then assembles them.
    """
    rows_by_process: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        start, stop, _ = index[0].indices(global_shape[0])
        rows_by_process.setdefault(device.process_index, set()).add((start, stop))
    groups = sorted({tuple(sorted(rows)) for rows in rows_by_process.values()})
    sizes = {sum(b - a for a, b in g) for g in groups}
    if len(sizes) != 1 or sum(sizes) * len(groups) != global_shape[0]:
        raise ValueError(f"the batch sharding {sharding.spec} gives processes unequal or overlapping rows: {groups}")
    return groups.index(tuple(sorted(rows_by_process[jax.process_index()]))), len(groups)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding, global_batch_size: int) -> dict:
    """This process's rows -> global ``jax.Array``s (each host feeds only its part)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
    return out


def replicated_batch(full: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """A batch that every process holds whole (eval batches) -> global arrays with ``sharding``."""
    out = {}
    for k, v in full.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out
