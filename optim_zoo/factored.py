"""Adafactor's factored second moment, as tensor2tensor computes it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_zoo import _checks


class ScaleByFactoredRmsState(NamedTuple):
    """State of :func:`scale_by_factored_rms`.

    The statistics are tuples with one entry per parameter leaf, in ``jax.tree.leaves`` order,
    and ``None`` where a leaf does not use that statistic. A factored n x m matrix holds n + m
    floats; nothing is allocated for the statistics a leaf does not need. Keeping them out of the
    params' tree structure also keeps wrappers that carry a parameter's sharding metadata (as
    Flax NNX variables do) off the reduced statistics, which have one axis fewer. On a device
    mesh each statistic is sharded like its parameter without the reduced axis.
    """

    count: jax.Array  # shape (), int32: updates taken so far.
    v_row: tuple[jax.Array | None, ...]  # mean of g**2 over the larger factored axis.
    v_col: tuple[jax.Array | None, ...]  # mean of g**2 over the other factored axis.
    v: tuple[jax.Array | None, ...]  # full EMA of g**2 for unfactored leaves.


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
    order = np.argsort(shape, kind="stable")  # stable: among equal sizes, later axes sort last.
    small_axis, large_axis = int(order[-2]), int(order[-1])
    if shape[small_axis] < min_dim_size_to_factor:
        return None
    return small_axis, large_axis


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


def scale_by_factored_rms(
    min_dim_size_to_factor: int = 128,
    decay_rate: jax.typing.ArrayLike = 0.8,
    decay_offset: jax.typing.ArrayLike = 0,
    eps: jax.typing.ArrayLike = 1e-30,
    *,
    factored: bool = True,
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
    :math:`u_t = g / \sqrt{V_t}`. Statistics are kept in at least float32. No clipping, learning
    rate, parameter scale or sign flip is applied: :func:`optim_zoo.adafactor` chains those.

    Args:
      min_dim_size_to_factor: factor a leaf only when its second-largest axis has at least this
        many elements; 0 factors every leaf with two or more axes, as tensor2tensor does.
      decay_rate: exponent of the second-moment decay schedule, in (0, 1].
      decay_offset: step at which the decay schedule restarts (for fine-tuning).
      eps: added to the squared gradient; >= 0.
      factored: whether to factor at all.

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
      is computed in the statistics' dtype, and unfactored leaves carry no placeholder state.
    """
    _checks.check_interval("min_dim_size_to_factor", min_dim_size_to_factor, 0)
    _checks.check_interval("decay_rate", decay_rate, 0.0, 1.0, low_open=True, high_open=False)
    _checks.check_interval("eps", eps, 0.0)

    def leaf_dims(leaf):
        return factored_dims(leaf.shape, factored, min_dim_size_to_factor)

    def init_fn(params: optax.Params) -> ScaleByFactoredRmsState:
        v_row, v_col, v = [], [], []
        for p in jax.tree.leaves(params):
            dims, dtype = leaf_dims(p), _checks.stats_dtype(p.dtype)
            if dims is None:
                v_row.append(None)
                v_col.append(None)
                v.append(jnp.zeros_like(p, dtype=dtype))
            else:
                small_axis, large_axis = dims
                v_row.append(_zeros_without_axis(p, large_axis, dtype))
                v_col.append(_zeros_without_axis(p, small_axis, dtype))
                v.append(None)
        return ScaleByFactoredRmsState(
            count=jnp.zeros([], jnp.int32), v_row=tuple(v_row), v_col=tuple(v_col), v=tuple(v)
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByFactoredRmsState, params: Any = None
    ) -> tuple[optax.Updates, ScaleByFactoredRmsState]:
        del params
        grads, treedef = jax.tree.flatten(updates)
        new_updates, v_row, v_col, v = [], [], [], []
        for g, row, col, full in zip(grads, state.v_row, state.v_col, state.v, strict=True):
            dims = leaf_dims(g)
            dtype = (full if dims is None else row).dtype  # as stored: at least float32
            step = (state.count - decay_offset + 1).astype(dtype)
            decay = 1 - step ** (-jnp.asarray(decay_rate, dtype))
            g_ = g.astype(dtype)
            if dims is None:
                full = decay * full + (1 - decay) * (jnp.square(g_) + eps)
                u = g_ * jax.lax.rsqrt(full)
            else:
                small_axis, large_axis = dims
                # mean(g**2) + eps is mean(g**2 + eps) up to rounding. Written so, and with |g|
                # in one of the two, each mean squares g inside its own reduction instead of
                # sharing one g**2 that XLA would keep in a temporary buffer as large as g.
                row_g_sq = jnp.mean(jnp.square(g_), axis=large_axis) + eps
                col_g_sq = jnp.mean(jnp.abs(g_) * jnp.abs(g_), axis=small_axis) + eps
                row = decay * row + (1 - decay) * row_g_sq
                col = decay * col + (1 - decay) * col_g_sq
                # `row` lost `large_axis`: find `small_axis` among its remaining axes.
                row_small_axis = small_axis - (small_axis > large_axis)
                row_mean = jnp.mean(row, axis=row_small_axis, keepdims=True)
                row_factor = jax.lax.rsqrt(row / row_mean)
                col_factor = jax.lax.rsqrt(col)
                u = (
                    g_
                    * jnp.expand_dims(row_factor, large_axis)
                    * jnp.expand_dims(col_factor, small_axis)
                )
            new_updates.append(u.astype(g.dtype))
            v_row.append(row)
            v_col.append(col)
            v.append(full)
        new_state = ScaleByFactoredRmsState(
            count=optax.safe_increment(state.count),
            v_row=tuple(v_row),
            v_col=tuple(v_col),
            v=tuple(v),
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


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
