"""Sums over whole leaves when a transform sees only this device's shards (inside shard_map),
and state zeros placed on a parameter's own mesh (:func:`zeros_placed`).

Inside :func:`jax.shard_map` each leaf is a shard, and its type records the mesh axes it varies
over: a leaf split over an axis holds different values on that axis's devices, a leaf
replicated over it the same values on each. A sum over every element of every leaf is then each
leaf's local sum, divided by the number of devices holding a copy of that shard, added up and
summed across the named axes with one ``psum``: one scalar all-reduce, each element counted
once.

This relies on shard_map's type checking (``check_vma=True``, the default): with it off, every
leaf looks replicated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def zeros_placed(target: jax.ShapeDtypeStruct, param: Any) -> jax.Array:
    """Zeros of `target`, a state leaf's shape computed from `param` (``jax.eval_shape``), with
    its sharding.

    With explicit mesh axes the sharding is part of the type, and its mesh is abstract: placed
    as it is, outside a mesh context (``jax.set_mesh``), JAX refuses it. A concrete `param`
    sharded on a mesh gives that mesh instead, so that its state is placed as ``optax``'s
    ``zeros_like`` state is, context or not.
    """
    concrete = isinstance(param, jax.Array) and not isinstance(param, jax.core.Tracer)
    sharding = param.sharding if concrete else None
    if target.sharding is None or not isinstance(sharding, jax.sharding.NamedSharding):
        return jnp.zeros_like(target)
    placed = jax.sharding.NamedSharding(sharding.mesh, target.sharding.spec)
    return jnp.zeros(target.shape, target.dtype, device=placed)


def varying_axes(x: jax.Array) -> frozenset[str]:
    """The manual mesh axes over which `x` holds different values on different devices."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.8


# What the transforms without `axis_name` tell a caller whose leaves vary inside shard_map.
UNDER_JIT = (
    "Compute the update under jax.jit with sharded arrays instead, where XLA sums across "
    "the devices."
)


def check_whole_leaves(leaves: Sequence[jax.Array], name: str, reduction: str, remedy: str) -> None:
    """Raises where `leaves` vary over shard_map axes: `reduction` over them would be partial.

    A leaf varies over an axis when it is split over it, or when it differs between that axis's
    devices for another reason (a gradient of a split batch not yet summed across them).
    Outside shard_map, and with its ``check_vma=False``, no leaf varies: nothing is checked.
    """
    split = sorted(set().union(*(varying_axes(x) for x in leaves)))
    if split:
        raise ValueError(
            f"{name}: its leaves are split over the shard_map axes {split} (or differ between "
            f"their devices), so {reduction} would cover only this device's shards. {remedy}"
        )


def _axis_sizes(axis_names: tuple[str, ...], name: str) -> dict[str, int]:
    sizes = {}
    for axis in axis_names:
        try:
            sizes[axis] = jax.lax.axis_size(axis)
        except NameError as e:
            raise ValueError(
                f"{name}: axis_name {axis!r} is not an axis of an enclosing shard_map; "
                "axis_name is for updates computed inside jax.shard_map"
            ) from e
    return sizes


def total_and_count(
    sums: Sequence[jax.Array],
    leaves: Sequence[jax.Array],
    axis_names: tuple[str, ...],
    zero: jax.Array,
    name: str,
) -> tuple[jax.Array, int]:
    """The sum over every element of the whole leaves, and how many elements they hold.

    `sums[i]` is the sum over this device's shard `leaves[i]`, added up starting from `zero`.
    Summed across `axis_names` with one psum (none for no axes); each leaf's sum is first
    divided by the number of devices along `axis_names` that hold the same shard, so that a
    replicated leaf counts once.
    """
    sizes = _axis_sizes(axis_names, name)
    parts, count = [], 0
    for leaf_sum, leaf in zip(sums, leaves, strict=True):
        varying = varying_axes(leaf)
        copies = math.prod(size for axis, size in sizes.items() if axis not in varying)
        count += leaf.size * math.prod(size for axis, size in sizes.items() if axis in varying)
        parts.append(leaf_sum if copies == 1 else leaf_sum / copies)
    local = sum(parts, zero)
    return (jax.lax.psum(local, axis_names) if axis_names else local), count
