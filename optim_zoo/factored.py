"""Adafactor's factored second moment, as tensor2tensor computes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_zoo import _checks, _tree


class ScaleByFactoredRmsState(NamedTuple):
    """State of :func:`scale_by_factored_rms`.

    The statistics are tuples (``PerLeaf``, which also remember the leaves' keys, so that
    ``update`` refuses a gradient tree other than the one ``init`` saw) with one entry per
    parameter leaf, in ``jax.tree.leaves`` order, and ``None`` where a leaf does not use that
    statistic. A factored n x m matrix holds n + m
    floats; nothing is allocated for the statistics a leaf does not need. Keeping them out of the
    params' tree structure also keeps wrappers that carry a parameter's sharding metadata (as
    Flax NNX variables do) off the reduced statistics, which have one axis fewer. On a device
    mesh each statistic is sharded like its parameter without the reduced axis.
    """

    count: jax.Array  # shape (), int32: updates taken so far.
    v_row: tuple[jax.Array | None, ...]  # mean of g**2 over the larger factored axis.
    v_col: tuple[jax.Array | None, ...]  # mean of g**2 over the other factored axis.
    v: tuple[jax.Array | None, ...]  # full EMA of g**2 for unfactored leaves.


class FactoredSecondMoment(NamedTuple):
    """A second-moment estimate kept the way :func:`scale_by_factored_rms` keeps it.

    The second moment of :func:`optim_zoo.scale_by_nesterov_moment` and
    :func:`optim_zoo.scale_by_adaptive_inertia` with ``factored=True``. As in
    :class:`ScaleByFactoredRmsState`, each field is a tuple with one entry per parameter leaf,
    and ``None`` where a leaf does not use that statistic: a factored n x m matrix holds n + m
    floats, any other leaf a full array.
    """

    v_row: tuple[jax.Array | None, ...]  # EMA of the mean square over the larger factored axis.
    v_col: tuple[jax.Array | None, ...]  # EMA of the mean square over the other factored axis.
    v: tuple[jax.Array | None, ...]  # full EMA of the square for unfactored leaves.


def factored_dims(
    shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """The two axes a leaf's second moment is factored over, or None when it is not factored.

    Returns ``(small_axis, large_axis)``: the two largest axes, ties going to the later axis.
    Other axes are batch axes. A leaf is factored when it has two or more axes, no zero-size
    axis, and its second-largest axis has at least ``min_dim_size_to_factor`` elements.
    """
    if not factored or len(shape) < 2 or 0 in shape:
        return None
    small_axis, large_axis = _largest_axes(shape)
    if shape[small_axis] < min_dim_size_to_factor:
        return None
    return small_axis, large_axis


def _largest_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(small_axis, large_axis)``: the two largest axes of `shape`, ties to the later axis."""
    order = np.argsort(shape, kind="stable")  # stable: among equal sizes, later axes sort last.
    return int(order[-2]), int(order[-1])


def stored_dims(
    stats: tuple[jax.Array | None, ...], shape: tuple[int, ...]
) -> tuple[int, int] | None:
    """The factored axes of a leaf of `shape` whose statistics are `stats`, or None.

    ``update`` reads the layout ``init`` chose from the state itself (a full ``v`` or a row and
    a column), so a traced ``min_dim_size_to_factor`` never reaches a Python ``if`` there.
    """
    return None if stats[2] is not None else _largest_axes(shape)


def _zeros_without_axis(param: Any, axis: int, dtype: jnp.dtype) -> jax.Array:
    """Zeros shaped like `param` reduced over `axis`, sharded like `param` minus that axis.

    With explicit mesh axes the sharding is part of the type, so `jax.eval_shape` of the
    reduction already carries it (also under `jax.jit` and `jax.eval_shape`). With auto axes it
    is not: a concrete `param` with a `NamedSharding` then gives its spec with `axis` dropped, so
    that a factored row or column is sharded as the matrix it summarises, never replicated. A
    tracer with auto axes has no sharding to read; the compiler, or the caller's
    `out_shardings`, decides there, as for every other state leaf.

    Example (8 devices, a (2, 4) mesh with auto axes)::

      w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", "model")))
      _zeros_without_axis(w, 1, jnp.float32).sharding.spec  # P('data',)
    """
    target = jax.eval_shape(lambda p: jnp.mean(p, axis=axis).astype(dtype), param)
    if target.sharding is not None or isinstance(param, jax.core.Tracer):
        return jnp.zeros_like(target)
    sharding = getattr(param, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return jnp.zeros_like(target)  # One device, or no per-axis spec to drop an axis from.
    spec = list(sharding.spec) + [None] * (len(param.shape) - len(sharding.spec))
    del spec[axis]
    reduced = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*spec), memory_kind=sharding.memory_kind
    )
    return jnp.zeros(target.shape, target.dtype, device=reduced)


def init_second_moment(
    params: optax.Params,
    factored: bool,
    min_dim_size_to_factor: Any,
    dtype_second_moment: jnp.dtype | None = None,
) -> tuple[_tree.PerLeaf, ...]:
    """Zero statistics ``(v_row, v_col, v)`` for the leaves of `params`, as three PerLeafs.

    A leaf that :func:`factored_dims` factors gets a row and a column statistic, each sharded
    like the leaf minus the reduced axis; any other leaf gets a full array. The dtype is
    `dtype_second_moment`, or at least float32 when it is None.
    """
    if _tree.is_params_placeholder(params):
        return (_tree.PER_LEAF_PLACEHOLDER,) * 3
    min_dim_size_to_factor = (
        _checks.static_int("min_dim_size_to_factor", min_dim_size_to_factor) if factored else 0
    )
    v_row, v_col, v = [], [], []
    for p in jax.tree.leaves(params):
        dims = factored_dims(p.shape, factored, min_dim_size_to_factor)
        dtype = _checks.stats_dtype(p.dtype, dtype_second_moment)
        if dims is None:
            v_row.append(None)
            v_col.append(None)
            v.append(jnp.zeros_like(p, dtype=dtype))
        else:
            small_axis, large_axis = dims
            v_row.append(_zeros_without_axis(p, large_axis, dtype))
            v_col.append(_zeros_without_axis(p, small_axis, dtype))
            v.append(None)
    keys = _tree.leaf_keys(params)
    return tuple(_tree.PerLeaf(stat, keys) for stat in (v_row, v_col, v))


def update_second_moment(
    stats: tuple[jax.Array | None, ...],
    x: jax.Array,
    decay: jax.typing.ArrayLike,
    dims: tuple[int, int] | None,
    eps: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array | None, ...]:
    """One EMA step of ``x**2 (+ eps)`` for one leaf's statistics ``(v_row, v_col, v)``.

    The results are in the dtype of `x`; the caller casts them to the stored dtype. On XLA:CPU
    a reduction fuses no elementwise producer, so when `x` is computed rather than read (as
    Adan's Nesterov gradient) XLA writes it to one temporary buffer as large as the leaf, which
    both reductions read.
    """
    v_row, v_col, v = stats
    if dims is None:
        square = jnp.square(x) if eps is None else jnp.square(x) + eps
        return None, None, decay * v.astype(x.dtype) + (1 - decay) * square
    small_axis, large_axis = dims
    # Each mean squares x inside its own reduction (|x| * |x| in one of them) instead of sharing
    # one x**2, which XLA would keep in a temporary buffer as large as x.
    row_square = jnp.mean(jnp.square(x), axis=large_axis)
    col_square = jnp.mean(jnp.abs(x) * jnp.abs(x), axis=small_axis)
    if eps is not None:  # mean(x**2) + eps is mean(x**2 + eps) up to rounding.
        row_square, col_square = row_square + eps, col_square + eps
    v_row = decay * v_row.astype(x.dtype) + (1 - decay) * row_square
    v_col = decay * v_col.astype(x.dtype) + (1 - decay) * col_square
    return v_row, v_col, None


def cast_second_moment(
    stats: tuple[jax.Array | None, ...], like: tuple[jax.Array | None, ...]
) -> tuple[jax.Array | None, ...]:
    """One leaf's statistics cast to the dtypes of `like`, the stored ones."""
    return tuple(
        None if x is None else x.astype(old.dtype) for x, old in zip(stats, like, strict=True)
    )


def upcast(stats: tuple[jax.Array | None, ...], dtype: jnp.dtype) -> tuple[jax.Array | None, ...]:
    """One leaf's statistics in the arithmetic's dtype (a no-op when stored in it)."""
    return tuple(None if x is None else x.astype(dtype) for x in stats)


def broadcastable_stats(
    stats: tuple[jax.Array | None, ...], dims: tuple[int, int] | None
) -> list[jax.Array]:
    """One leaf's statistics, each expanded to broadcast against the leaf (for ordering)."""
    v_row, v_col, v = stats
    if dims is None:
        return [v]
    small_axis, large_axis = dims
    return [jnp.expand_dims(v_row, large_axis), jnp.expand_dims(v_col, small_axis)]


def second_moment_parts(
    stats: tuple[jax.Array | None, ...],
    dims: tuple[int, int] | None,
    fn: Callable[[jax.Array], jax.Array] = lambda x: x,
) -> tuple[jax.Array, jax.typing.ArrayLike]:
    r"""Two factors that broadcast against the leaf; ``fn`` of the estimate is their product.

    For a factored leaf the estimate is :math:`V = (R / \mathrm{mean}(R)) \otimes C`, the
    rank-one reconstruction of Adafactor, taken as zero where :math:`\mathrm{mean}(R) = 0`
    (every gradient seen so far is zero), and as infinite where :math:`\mathrm{mean}(R)`
    overflowed to infinity (instead of tensor2tensor's :math:`\infty / \infty` = NaN), so that
    a step divided by :math:`\sqrt V` is zero there, as it is for a full second moment that
    overflows. A NaN statistic stays NaN. The factors are ``fn`` of the two vectors, expanded:
    right for any ``fn`` with ``fn(a b) = fn(a) fn(b)``, such as the identity or ``rsqrt``.
    For an unfactored leaf they are ``fn(v)`` and 1.
    """
    v_row, v_col, v = stats
    if dims is None:
        return fn(v), 1
    small_axis, large_axis = dims
    # `v_row` lost `large_axis`: find `small_axis` among its remaining axes.
    row_mean = jnp.mean(v_row, axis=small_axis - (small_axis > large_axis), keepdims=True)
    overflow = jnp.isinf(row_mean)
    row_ratio = jnp.where(row_mean == 0, 0, v_row / jnp.where(row_mean == 0, 1, row_mean))
    row_ratio = jnp.where(overflow, jnp.inf, row_ratio)
    # `overflow` has v_row's axes; as v_col's: back to the leaf's axes, then drop small_axis.
    col = jnp.where(jnp.squeeze(jnp.expand_dims(overflow, large_axis), small_axis), 1, v_col)
    return (
        jnp.expand_dims(fn(row_ratio), large_axis),
        jnp.expand_dims(fn(col), small_axis),
    )


def second_moment_sum(
    stats: tuple[jax.Array | None, ...], dims: tuple[int, int] | None
) -> jax.Array:
    """The sum of every element of one leaf's second-moment estimate, without forming it."""
    row_part, col_part = second_moment_parts(stats, dims)
    if dims is None:
        return jnp.sum(row_part)
    small_axis, large_axis = dims
    # Sum over both factored axes of an outer product: the product of the two sums, per batch.
    return jnp.sum(
        jnp.sum(row_part, axis=small_axis, keepdims=True)
        * jnp.sum(col_part, axis=large_axis, keepdims=True)
    )


def init_moment_state(
    params: optax.Params,
    factored: bool,
    min_dim_size_to_factor: int,
    dtype_second_moment: jnp.dtype | None,
) -> optax.Params | FactoredSecondMoment:
    """A zero second moment: a :class:`FactoredSecondMoment` when factored, else like params."""
    if not factored:
        return _tree.second_moment_zeros(params, dtype_second_moment)
    return FactoredSecondMoment(
        *init_second_moment(params, True, min_dim_size_to_factor, dtype_second_moment)
    )


def moment_state_leaves(
    moment: optax.Params | FactoredSecondMoment, updates: optax.Updates, factored: bool, name: str
) -> list[tuple[jax.Array | None, ...]]:
    """Per leaf of `updates`, its ``(v_row, v_col, v)``: ``(None, None, v)`` when not factored.

    Raises `ValueError` when `updates` is not the tree the state was made for.
    """
    if factored:
        return per_leaf_stats(moment, updates, name)
    return [(None, None, v) for v in _tree.leaves_like(updates, moment, name)]


def per_leaf_stats(
    stats: ScaleByFactoredRmsState | FactoredSecondMoment, updates: optax.Updates, name: str
) -> list[tuple[jax.Array | None, ...]]:
    """Per leaf of `updates`, its ``(v_row, v_col, v)`` from the PerLeaf fields of `stats`."""
    _tree.check_leaf_keys(_tree.leaf_keys(updates), stats.v.keys, name)
    return list(zip(stats.v_row, stats.v_col, stats.v, strict=True))


def stats_from_leaves(
    per_leaf: list[tuple[jax.Array | None, ...]], keys: tuple[str, ...]
) -> tuple[_tree.PerLeaf, _tree.PerLeaf, _tree.PerLeaf]:
    """The inverse of :func:`per_leaf_stats`: the fields ``(v_row, v_col, v)``, with `keys`."""
    v_row, v_col, v = (_tree.PerLeaf(column, keys) for column in _tree.unzip(per_leaf, 3))
    return v_row, v_col, v


def moment_state_from_leaves(
    per_leaf: list[tuple[jax.Array | None, ...]],
    like: optax.Params | FactoredSecondMoment,
    treedef: Any,
    factored: bool,
) -> optax.Params | FactoredSecondMoment:
    """The inverse of :func:`moment_state_leaves`, with the keys of `like`, the old state."""
    if factored:
        return FactoredSecondMoment(*stats_from_leaves(per_leaf, like.v.keys))
    return treedef.unflatten([v for _, _, v in per_leaf])


def scale_by_factored_rms(
    min_dim_size_to_factor: int = 128,
    decay_rate: jax.typing.ArrayLike = 0.8,
    decay_offset: jax.typing.ArrayLike = 0,
    eps: jax.typing.ArrayLike = 1e-30,
    *,
    factored: bool = True,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adafactor's (factored) estimate of the gradient's RMS.

    With :math:`c` the number of earlier updates,
    :math:`\beta_c = 1 - (c - \text{decay\_offset} + 1)^{-\text{decay\_rate}}` (zero on the first
    step) and :math:`G = g^2 + \epsilon`. For a factored leaf with axes :math:`(a, b)`, :math:`b`
    the larger,

    .. math::

      R_t &= \beta_c R_{t-1} + (1 - \beta_c)\, \mathrm{mean}_b(G) \\
      C_t &= \beta_c C_{t-1} + (1 - \beta_c)\, \mathrm{mean}_a(G) \\
      u_t &= g \,/\, \sqrt{(R_t / \mathrm{mean}(R_t)) \otimes C_t}

    and for any other leaf :math:`V_t = \beta_c V_{t-1} + (1 - \beta_c) G`,
    :math:`u_t = g / \sqrt{V_t}`. Statistics are stored in ``dtype_second_moment`` (default: at
    least float32); the arithmetic runs in at least float32 whatever the storage. No clipping,
    learning rate, parameter scale or sign flip is applied: :func:`optim_zoo.adafactor` chains
    those.

    Args:
      min_dim_size_to_factor: factor a leaf only when its second-largest axis has at least this
        many elements; 0 factors every leaf with two or more axes, as tensor2tensor does.
      decay_rate: exponent of the second-moment decay schedule, > 0 (0.8 in the paper; values
        above 1 are accepted, as tensor2tensor and optax do).
      decay_offset: step at which the decay schedule restarts (for fine-tuning), >= 0; earlier
        steps, as on a fresh state with a positive offset, count as the first.
      eps: added to the squared gradient; >= 0.
      factored: whether to factor at all.
      dtype_second_moment: dtype the statistics are stored in; None means float32, or the
        parameter's dtype when it is wider.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, optim_zoo
      >>> tx = optax.chain(optim_zoo.scale_by_factored_rms(min_dim_size_to_factor=2),
      ...                  optax.scale(-0.1))
      >>> params = jnp.ones((2, 3))
      >>> state = tx.init(params)
      >>> [s.shape for s in state[0].v_row + state[0].v_col]
      [(2,), (3,)]
      >>> updates, state = tx.update(2 * params, state, params)
      >>> print(optax.apply_updates(params, updates)[0])
      [0.9 0.9 0.9]

    References:
      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, 2018; official code: tensorflow/tensor2tensor,
      ``tensor2tensor/utils/adafactor.py``.

    Differences:
      tensor2tensor always factors the last two axes; like ``optax.scale_by_factored_rms`` this
      factors the two largest (identical for matrices, and the factored update is symmetric in
      the two axes). Unlike optax, statistics stay in float64 for float64 parameters, the decay
      is computed in the arithmetic's dtype, and unfactored leaves carry no placeholder state.
      Steps before ``decay_offset`` count as the first (decay 0) where tensor2tensor and optax
      raise a negative number to a fractional power (NaN). Row statistics whose mean overflows
      to infinity give an infinite estimate and a zero update (tensor2tensor: inf / inf =
      NaN); in float32, as in the official code, ``g**2`` overflows at ``|g|`` ~ 1e19. A
      complex leaf is trained as its real and imaginary parts (PyTorch's convention; optax
      keeps one statistic of ``|g|**2`` per complex element), stacked on a new first axis, so
      a complex vector is a two-row matrix here.
    """
    _checks.check_interval("min_dim_size_to_factor", min_dim_size_to_factor, 0)
    _checks.check_interval("decay_rate", decay_rate, 0.0, low_open=True)
    _checks.check_interval("decay_offset", decay_offset, 0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_flag("factored", factored)
    dtype_second_moment = _checks.check_second_moment_dtype(dtype_second_moment)

    def init_fn(params: optax.Params) -> ScaleByFactoredRmsState:
        v_row, v_col, v = init_second_moment(
            params, factored, min_dim_size_to_factor, dtype_second_moment
        )
        return ScaleByFactoredRmsState(
            count=jnp.zeros([], jnp.int32), v_row=v_row, v_col=v_col, v=v
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByFactoredRmsState, params: Any = None
    ) -> tuple[optax.Updates, ScaleByFactoredRmsState]:
        del params
        grads, treedef = jax.tree.flatten(updates)
        new_updates, new_stats = [], []
        for g, stats in zip(
            grads, per_leaf_stats(state, updates, "scale_by_factored_rms"), strict=True
        ):
            dims = stored_dims(stats, g.shape)
            stored = [x.dtype for x in stats if x is not None]
            dtype = _checks.compute_dtype(g.dtype, *stored)
            # Steps before decay_offset (a fresh state with an offset) count as the first.
            step = (jnp.maximum(state.count - decay_offset, 0) + 1).astype(dtype)
            decay = 1 - step ** (-jnp.asarray(decay_rate, dtype))
            g_ = g.astype(dtype)
            # The update reads the statistics as stored (a no-op unless stored narrower).
            new = cast_second_moment(update_second_moment(stats, g_, decay, dims, eps), stats)
            row_factor, col_factor = second_moment_parts(upcast(new, dtype), dims, jax.lax.rsqrt)
            new_updates.append((g_ * row_factor * col_factor).astype(g.dtype))
            new_stats.append(new)
        v_row, v_col, v = stats_from_leaves(new_stats, state.v.keys)
        new_state = ScaleByFactoredRmsState(
            count=optax.safe_increment(state.count), v_row=v_row, v_col=v_col, v=v
        )
        return treedef.unflatten(new_updates), new_state

    return _tree.on_real_arrays(
        optax.GradientTransformation(init_fn, update_fn), "scale_by_factored_rms"
    )


def relative_step_size(multiply_by_parameter_scale: bool = True) -> optax.Schedule:
    r"""Adafactor's default step size, :math:`\min(10^{-2}, 1/\sqrt{t})` with :math:`t = c + 1`.

    tensor2tensor multiplies it by 0.05 when the update is not scaled by the parameter's RMS.

    Args:
      multiply_by_parameter_scale: whether the step is later multiplied by the parameter RMS.

    Returns:
      A schedule of the step count :math:`c` (0 on the first step).
    """
    scale = 1.0 if multiply_by_parameter_scale else 0.05

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(count) + 1
        return scale * jnp.minimum(1e-2, jax.lax.rsqrt(t.astype(jnp.result_type(float))))

    return schedule
