"""Small pytree helpers shared by the primitives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def map_leaves(fn: Callable[..., tuple], num_outputs: int, tree: Any, *rest: Any) -> tuple:
    """Maps `fn` over the leaves of `tree` (and matching leaves of `rest`), unzipping results.

    `fn` returns a tuple of `num_outputs` arrays per leaf; the result is a tuple of
    `num_outputs` trees, each with the structure of `tree`. Unlike `jax.tree.map` returning
    tuples, this works for empty trees and never confuses a result tuple with tree structure.
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    results = [fn(*args) for args in zip(leaves, *rest_leaves, strict=True)]
    columns = list(zip(*results, strict=True)) if results else [()] * num_outputs
    return tuple(treedef.unflatten(column) for column in columns)


def resolve_mask(mask: Any, params: Any) -> Any:
    """Returns the boolean mask tree for `params`: all True when `mask` is None."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask
