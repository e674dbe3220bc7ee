"""Small pytree helpers shared by the primitives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optim_zoo import _checks


def map_leaves(fn: Callable[..., tuple], num_outputs: int, tree: Any, *rest: Any) -> tuple:
    """Maps `fn` over the leaves of `tree` (and matching leaves of `rest`), unzipping results.

    `fn` returns a tuple of `num_outputs` arrays per leaf; the result is a tuple of
    `num_outputs` trees, each with the structure of `tree`. Unlike `jax.tree.map` returning
    tuples, this works for empty trees and never confuses a result tuple with tree structure.
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    results = [fn(*args) for args in zip(leaves, *rest_leaves, strict=True)]
    return tuple(treedef.unflatten(column) for column in unzip(results, num_outputs))


def unzip(rows: list[tuple], num_columns: int) -> tuple[tuple, ...]:
    """The columns of `rows` as tuples; `num_columns` empty tuples when `rows` is empty."""
    if not rows:
        return ((),) * num_columns
    return tuple(tuple(column) for column in zip(*rows, strict=True))


def first_moment_zeros(params: Any, dtype_momentum: jnp.dtype | None) -> Any:
    """Zeros like `params`, in `dtype_momentum` or, when it is None, each parameter's dtype."""
    return jax.tree.map(
        lambda p: jnp.zeros_like(p, _checks.momentum_dtype(p.dtype, dtype_momentum)), params
    )


def second_moment_zeros(params: Any, dtype_second_moment: jnp.dtype | None) -> Any:
    """Zeros like `params`, in `dtype_second_moment` or, when it is None, at least float32."""
    return jax.tree.map(
        lambda p: jnp.zeros_like(p, _checks.stats_dtype(p.dtype, dtype_second_moment)), params
    )


def resolve_mask(mask: Any, params: Any) -> Any:
    """Returns the boolean mask tree for `params`: all True when `mask` is None."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask


def unshared(x: jax.Array, never: jax.Array) -> jax.Array:
    """Returns `x` unchanged, as an instruction of its own.

    When one elementwise value (such as ``g + wd * p`` from :func:`optax.add_decayed_weights`)
    feeds a reduction and also an elementwise output, XLA writes it to a temporary buffer as
    large as the leaf instead of recomputing it inside each loop that needs it. A select on
    `never`, a traced boolean scalar that is always False (such as ``count < 0``), gives one
    consumer its own copy, which XLA then recomputes in that consumer's loop. The selected value
    is always `x`, non-finite values included.
    """
    return ordered_after(x, never)


def ordered_after(x: jax.Array, never: jax.Array, *deps: jax.Array) -> jax.Array:
    """Returns `x` unchanged, but computed only after the arrays `deps` (shaped like `x`) exist.

    A donated state leaf is updated in place. When its new value is computed by an
    instruction that XLA cannot prove runs after every reader of the old value, XLA first
    copies the old value to a temporary buffer as large as the leaf (on CPU a fresh buffer
    costs a page fault per page). Reading `deps` in the loop that writes `x` creates that
    order; it is elementwise, so sharded arrays stay sharded. `never` is as in
    :func:`unshared`.
    """
    late = never
    for dep in deps:
        late = late & (dep != 0)
    return jnp.where(late, jnp.zeros_like(x), x)
