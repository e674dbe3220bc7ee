"""How the updates steer XLA's buffer reuse, in one place.

An update is memory-bound: its floor is the bytes it must read and write. XLA:CPU gets close to
it only when every elementwise value is computed inside the loop that consumes it and every
state leaf is written in place. Five habits of its scheduler stand in the way, and each device
below answers one, without changing a single value:

* A reduction fuses no elementwise producer: a value that feeds both a reduction and an
  elementwise output (``g + wd * p`` from L2 decay, Adan's Nesterov gradient) is written to a
  temporary buffer as large as the leaf. :func:`own_copy` gives one consumer a copy of its own,
  which XLA then recomputes in that consumer's loop; :func:`mean_squares` squares inside each
  reduction instead of sharing one square.
* A donated state leaf is updated in place only when XLA can prove that every reader of the old
  value runs first; otherwise it copies the old value out (on CPU, a page fault per page of a
  fresh buffer). :func:`written_after` makes that order explicit.
* A value shared by a reduction and other consumers is kept in a temporary even when every
  consumer could recompute it, and XLA merges identical expressions into one shared value.
  :func:`decayed_for_reduction` spells L2 decay's ``g + wd * p`` another way for a reduction,
  equal bit for bit, so that the reduction computes it from the arrays in memory
  (:func:`decayed_for_reductions`: two ways, for two reductions).
  :func:`rebounded_for_reduction` does the same for a floored magnitude ``max(|x|, floor)``,
  and :func:`zeroed_for_reduction` for a value zeroed under a condition, which a reduction
  fuses as a clamp but not as a select.
* Independent reductions over large leaves all run at once, each with its temporary.
  :func:`measured_after` makes one wait for another, so their buffers can share memory.
* State stored narrower than the arithmetic (bfloat16) is widened where it is read, and XLA
  merges every widening of one array into a single value: read by two reductions, or by a
  reduction and a loop, it is written out in float32, twice the stored bytes.
  :func:`widened_for_reductions` gives each reduction a read of its own, behind
  :func:`apart`, which also makes a computed value's later readers take it from memory.

Each device but :func:`apart` and :func:`widened_for_reductions` (an optimization barrier) is a
select on a traced scalar that is never true, ``count < 0``
(:func:`never_true`), which XLA cannot fold away; the selected value is always the original,
non-finite values included. XLA also merges identical expressions across leaves: two leaves of
one shape would share one broadcast of a scalar that their reductions read, written out as
large as either. So the scalars of :func:`own_scalar` (and of the devices built on it) take the
leaf's own ``count < -i``, ``i`` its index. Elementwise, so sharded arrays stay sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def never_true(count: jax.Array, leaf: int = 0) -> jax.Array:
    """A traced boolean scalar that is always False: ``count < -leaf`` for a step count.

    `leaf` (the leaf's index, >= 0) makes each leaf's scalar an expression of its own, so that
    no scalar computed from it is merged with another leaf's.
    """
    return count < -leaf


def own_copy(x: jax.Array, never: jax.Array) -> jax.Array:
    """`x` itself, as an instruction of its own: this consumer recomputes it in its loop."""
    return written_after(x, never)


def written_after(x: jax.Array, never: jax.Array, *reads: jax.Array) -> jax.Array:
    """`x` itself, computed only after `reads` (scalars, or arrays shaped like `x`) exist.

    Reading `reads` in the loop that writes `x` orders that write after them, so a donated
    state leaf whose old value they read is overwritten in place. A scalar (a sum) costs
    nothing to read; an array is read whole, elementwise: one element would do, but on a mesh
    it lives on one device, and reading it everywhere reshards the state.
    """
    late = never
    for read in reads:
        late = late & (read != 0)
    return jnp.where(late, jnp.zeros_like(x), x)


def mean_squares(
    x: jax.Array, small_axis: int, large_axis: int, y: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(mean(x**2, large_axis), mean(y**2, small_axis))``, each squaring on its own.

    `y` defaults to `x`; given, it is `x` up to the sign of zeros, computed apart (see
    :func:`zeroed_for_reduction`). One shared ``x**2`` would be kept in a temporary buffer as
    large as `x`; squared inside each reduction (as ``|y| * |y|`` in the second, so XLA does not
    merge the two squares), it is not.
    """
    y = x if y is None else y
    return (
        jnp.mean(jnp.square(x), axis=large_axis),
        jnp.mean(jnp.abs(y) * jnp.abs(y), axis=small_axis),
    )


def measured_after(x: jax.Array, previous: jax.Array) -> jax.Array:
    """`x` itself, read only once `previous`, a sum of squares (never negative), exists."""
    return jnp.where(previous < 0, jnp.zeros_like(x), x)


def decayed_for_reduction(
    g: jax.Array, p: jax.Array, weight_decay: jax.typing.ArrayLike, never: jax.Array
) -> jax.Array:
    """``g + weight_decay * p``, bit for bit, as ``g - (-weight_decay) * p``: for a reduction.

    Negating a factor negates a product exactly, and subtracting a negated value is adding it,
    so every element is the same float (in any dtype, and for any decay, traced ones included).
    As a different expression it is not merged with the elementwise consumers' ``g + wd * p``,
    so it has the reduction as its only consumer, which fuses it instead of reading a
    temporary as large as the leaf. ``-weight_decay`` passes through :func:`own_scalar`.
    """
    return g - own_scalar(-weight_decay, never) * p


def decayed_for_reductions(
    g: jax.Array, p: jax.Array, weight_decay: jax.typing.ArrayLike, never: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Two copies of ``g + weight_decay * p``, bit for bit, for two reductions:
    :func:`decayed_for_reduction`, and ``g + wd' * p`` with ``wd'`` the decay passed through
    :func:`own_scalar`.

    Each is a different expression from the other and from the elementwise consumers'
    ``g + wd * p``, so that each reduction computes its copy in its own loop.
    """
    return decayed_for_reduction(g, p, weight_decay, never), g + own_scalar(weight_decay, never) * p


def rebounded_for_reduction(
    x: jax.Array, floor: jax.typing.ArrayLike, never: jax.Array
) -> jax.Array:
    """``max(|x|, floor)``, bit for bit, as ``max(|-x|, floor')``: for a reduction.

    ``|-x|`` is ``|x|`` in every bit, and ``floor'`` is `floor` passed through a select on
    `never` (see :func:`never_true`). As different instructions they are merged neither with
    the elementwise consumers' ``max(|x|, floor)`` nor with its broadcast of a constant `floor`
    (which XLA would then write out as large as `x`), so the reduction reads `x` from memory and
    computes the rest in its own loop instead of reading a temporary as large as the leaf.
    """
    return jnp.maximum(jnp.abs(-x), own_scalar(jnp.asarray(floor, x.dtype), never))


def own_scalar(value: jax.typing.ArrayLike, never: jax.Array) -> jax.Array:
    """`value` (a scalar, dtype and weak type kept) passed through a select on `never`.

    A constant that several reductions multiply by is broadcast once and written out as large
    as the leaf; each reduction's own scalar is broadcast inside its loop.
    """
    value = jnp.asarray(value)
    return jnp.where(never, jnp.zeros_like(value), value)


def zeroed_for_reduction(
    x: jax.Array, zero: jax.Array, never: jax.Array, spelling: int = 0
) -> jax.Array:
    """``where(zero, 0, x)`` for a reduction, as `x` clamped to scalar bounds: ``[0, 0]`` when
    the scalar `zero` holds, ``[-inf, inf]`` (`x` itself, bit for bit) otherwise; the bounds
    pass through :func:`own_scalar`.

    A reduction fuses a maximum and a minimum with scalar bounds but not a select, which it
    would read from a temporary as large as `x`. Equal to the select up to the sign of a zero,
    except where `x` is NaN and `zero` holds: the clamp keeps the NaN. Copies with different
    `spelling` (0 or 1) bound by 0 and -0 respectively, so that XLA does not merge the bounds of
    two reductions into one array.
    """
    bound = jnp.asarray(-0.0 if spelling else 0.0, x.dtype)
    low = own_scalar(jnp.where(zero, bound, -jnp.inf), never)
    high = own_scalar(jnp.where(zero, bound, jnp.inf), never)
    return jnp.minimum(jnp.maximum(x, low), high)


def apart(x: Any) -> Any:
    """`x` (an array or a tuple of them) itself, as a value XLA neither merges nor looks through.

    An identity, ``jax.lax.optimization_barrier``: XLA does not merge it with another read of
    `x`, and does not fuse the computation of `x` into its readers, which read `x` from memory.
    """
    return jax.lax.optimization_barrier(x)


def widened_for_reductions(
    x: jax.Array, dtype: jax.typing.DTypeLike, count: int, never: jax.Array | None = None
) -> list[jax.Array]:
    """`count` copies of `x` in `dtype`, bit for bit, one for each reduction that reads it.

    For `x` stored narrower than `dtype`: each copy is read through one more :func:`apart`
    than the one before, so that neither the copies nor the other readers of `x` share a
    widened array, which XLA would write out as large as the leaf in `dtype`; each reduction
    reads the stored bytes and widens them in its own loop. `x` already in `dtype`: `x`
    itself, `count` times.

    Give `never` (:func:`never_true`) for a reduction that sums a copy as it is: each copy is
    then multiplied by its own one (an exact product), since over a bare widening XLA:CPU sums
    in another order than over the same values in `dtype`, for some shapes (a 384 x 1024
    bfloat16 leaf among them).
    """
    dtype = jnp.dtype(dtype)
    if x.dtype == dtype:
        return [x] * count
    copies = []
    for i in range(count):
        x = apart(x)
        copy = x.astype(dtype)
        if never is not None:
            copy = copy * jnp.where(never, jnp.asarray(i + 2, dtype), jnp.asarray(1, dtype))
        copies.append(copy)
    return copies
