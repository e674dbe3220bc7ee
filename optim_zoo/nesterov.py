"""Adan's Nesterov moment estimate, and the two building blocks the official Adan wraps it in."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _tree
from optim_zoo.factored import (
    FactoredSecondMoment,
    broadcastable_stats,
    cast_second_moment,
    init_moment_state,
    moment_state_from_leaves,
    moment_state_leaves,
    second_moment_parts,
    stored_dims,
    upcast,
    update_second_moment,
)


class ScaleByNesterovMomentState(NamedTuple):
    """State of :func:`scale_by_nesterov_moment`."""

    count: jax.Array  # shape (), int32: updates taken so far.
    m: optax.Updates  # EMA of gradients; dtype_momentum (default: parameter dtype).
    v: optax.Updates  # EMA of gradient differences g_t - g_{t-1}; as m.
    # EMA of (g_t + b2 * diff_t)**2, like the params, or a FactoredSecondMoment when factored;
    # dtype_second_moment (default: at least float32).
    n: optax.Updates | FactoredSecondMoment
    prev_grad: optax.Updates  # gradient of the previous step; as m.


def scale_by_nesterov_moment(
    b1: jax.typing.ArrayLike = 0.98,
    b2: jax.typing.ArrayLike = 0.92,
    b3: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    factored: bool = False,
    min_dim_size_to_factor: int = 128,
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adan's Nesterov moment estimate, as the official code computes it.

    With :math:`\Delta_t = g_t - g_{t-1}` (zero on the first step),

    .. math::

      m_t &= b_1 m_{t-1} + (1 - b_1) g_t \\
      v_t &= b_2 v_{t-1} + (1 - b_2) \Delta_t \\
      n_t &= b_3 n_{t-1} + (1 - b_3) (g_t + b_2 \Delta_t)^2 \\
      u_t &= \frac{m_t / (1 - b_1^t) + b_2 v_t / (1 - b_2^t)}
                 {\sqrt{n_t / (1 - b_3^t) + \epsilon_{root}} + \epsilon}

    The betas are the official code's, the complements of the paper's: code ``(0.98, 0.92, 0.99)``
    is the paper's ``(0.02, 0.08, 0.01)``. No learning rate and no sign flip are applied.

    With ``factored=True`` (new here, not from the Adan paper or code), :math:`n` is kept as
    Adafactor keeps its second moment (:func:`optim_zoo.scale_by_factored_rms`): for a leaf
    that :func:`optim_zoo.factored_dims` factors, EMAs :math:`R, C` (decay :math:`b_3`) of the
    mean of :math:`(g_t + b_2 \Delta_t)^2` over each of its two largest axes, and
    :math:`n_t = (R_t / \mathrm{mean}(R_t)) \otimes C_t` in the update; other leaves keep the
    full :math:`n`. An n x m matrix then stores three full states plus n + m floats, not four.

    Args:
      b1: decay of the gradient EMA, in [0, 1).
      b2: decay of the gradient-difference EMA, and the weight of the difference in ``n``;
        in [0, 1).
      b3: decay of the squared Nesterov gradient EMA, in [0, 1).
      eps: added to the denominator, outside the square root; >= 0.
      eps_root: added inside the square root; >= 0.
      factored: keep ``n`` factored where a leaf allows.
      min_dim_size_to_factor: with ``factored``, factor a leaf only when its second-largest
        axis has at least this many elements.
      dtype_momentum: dtype ``m``, ``v`` and the previous gradient are stored in; None means
        the parameter's.
      dtype_second_moment: dtype ``n`` is stored in; None means float32, or the parameter's
        dtype when it is wider. The arithmetic runs in at least float32 whatever the storage.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, optim_zoo
      >>> tx = optax.chain(optim_zoo.scale_by_nesterov_moment(), optax.scale(-0.1))
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(2 * params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print([round(x, 3) for x in params.tolist()])
      [0.702, -1.701]

    References:
      Xie et al., `Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models
      <https://arxiv.org/abs/2208.06677>`_, 2022; official code: https://github.com/sail-sg/Adan

    Differences:
      ``optax.scale_by_adan`` weights the difference inside ``n`` by ``1 - b2`` instead of
      ``b2`` (and bias-corrects it accordingly), so it does not follow the official algorithm;
      this transform does. From the paper: the betas are complemented, as in the official code.
      As in the official code, :math:`(g + b_2 \Delta)^2` overflows float32 at ``|g|`` ~ 1e19:
      ``n`` is then infinite and the step zero (as Adam's); the factored estimate is infinite
      there too, not NaN. A complex leaf is trained as its real and imaginary parts (PyTorch's
      convention), each with its own moments.
    """
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        _checks.check_interval(name, value, 0.0, 1.0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("eps_root", eps_root, 0.0)
    _checks.check_interval("min_dim_size_to_factor", min_dim_size_to_factor, 0)
    _checks.check_flag("factored", factored)
    dtype_momentum = _checks.check_dtype("dtype_momentum", dtype_momentum)
    dtype_second_moment = _checks.check_second_moment_dtype(dtype_second_moment)

    def init_fn(params: optax.Params) -> ScaleByNesterovMomentState:
        return ScaleByNesterovMomentState(
            count=jnp.zeros([], jnp.int32),
            m=_tree.first_moment_zeros(params, dtype_momentum),
            v=_tree.first_moment_zeros(params, dtype_momentum),
            n=init_moment_state(params, factored, min_dim_size_to_factor, dtype_second_moment),
            prev_grad=_tree.first_moment_zeros(params, dtype_momentum),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByNesterovMomentState, params: Any = None
    ) -> tuple[optax.Updates, ScaleByNesterovMomentState]:
        del params
        count = optax.safe_increment(state.count)
        is_first = state.count == 0
        never = state.count < 0  # a traced False, for _tree.unshared and _tree.ordered_after
        grads, treedef = jax.tree.flatten(updates)
        name = "scale_by_nesterov_moment"
        n_stats = moment_state_leaves(state.n, updates, factored, name)

        def leaf_update(g, m, v, stats, prev_grad):
            dims = stored_dims(stats, g.shape)
            moment_dtype = m.dtype  # m, v and prev_grad share it.
            stored = [x.dtype for x in (m, *stats) if x is not None]
            dtype = _checks.compute_dtype(g.dtype, *stored)
            t = count.astype(dtype)
            g_ = g.astype(dtype)

            # The official code starts prev_grad at the first gradient: no difference on step 1.
            diff = jnp.where(is_first, jnp.zeros_like(g_), g_ - prev_grad.astype(dtype))
            # The direction reads the state as stored (a no-op unless it is stored narrower).
            m = (b1 * m.astype(dtype) + (1 - b1) * g_).astype(moment_dtype)
            v = (b2 * v.astype(dtype) + (1 - b2) * diff).astype(moment_dtype)
            new_stats = update_second_moment(stats, g_ + b2 * diff, b3, dims)
            new_stats = cast_second_moment(new_stats, stats)
            row_part, col_part = second_moment_parts(upcast(new_stats, dtype), dims)
            n_hat = row_part * col_part / (1 - b3**t)  # unfactored: n / (1 - b3**t)
            numerator = m.astype(dtype) / (1 - b1**t) + b2 * v.astype(dtype) / (1 - b2**t)
            direction = numerator / (jnp.sqrt(n_hat + eps_root) + eps)
            # v and n read the old prev_grad: overwrite it (in place, when donated) only after.
            late = [v, *broadcastable_stats(new_stats, dims)]
            prev_grad = _tree.ordered_after(g.astype(moment_dtype), never, *late)
            return direction.astype(g.dtype), m, v, new_stats, prev_grad

        results = [
            leaf_update(*args)
            for args in zip(
                grads,
                _tree.leaves_like(updates, state.m, name),
                _tree.leaves_like(updates, state.v, name),
                n_stats,
                _tree.leaves_like(updates, state.prev_grad, name),
                strict=True,
            )
        ]
        direction, m, v, n_stats, prev_grad = _tree.unzip(results, 5)
        new_state = ScaleByNesterovMomentState(
            count=count,
            m=treedef.unflatten(m),
            v=treedef.unflatten(v),
            n=moment_state_from_leaves(n_stats, state.n, treedef, factored),
            prev_grad=treedef.unflatten(prev_grad),
        )
        return treedef.unflatten(direction), new_state

    return _tree.on_real_arrays(
        optax.GradientTransformation(init_fn, update_fn), "scale_by_nesterov_moment"
    )


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike, eps: jax.typing.ArrayLike = 0.0
) -> optax.GradientTransformation:
    r"""Scales all updates by :math:`\min(1, \text{max\_norm} / (\lVert g \rVert_2 + \epsilon))`.

    This is the official Adan clip (``max_grad_norm``): one factor from the norm over every leaf,
    with ``eps`` in the denominator. With ``eps=0`` it equals :func:`optax.clip_by_global_norm`.
    The norm is accumulated in at least float32.

    Args:
      max_norm: largest global norm let through; > 0.
      eps: added to the norm in the denominator; >= 0.

    Returns:
      An :class:`optax.GradientTransformation` with empty state.
    """
    _checks.check_interval("max_grad_norm", max_norm, 0.0, low_open=True)
    _checks.check_interval("eps", eps, 0.0)

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        squares = [jnp.sum(jnp.square(g.astype(_checks.stats_dtype(g.dtype)))) for g in leaves]
        norm = jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))
        factor = jnp.minimum(max_norm / (norm + eps), 1.0)
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

    return _tree.on_real_arrays(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        "clip_by_global_norm",
    )


class ScaleByProximalLearningRateState(NamedTuple):
    """State of :func:`scale_by_proximal_learning_rate`."""

    count: jax.Array  # shape (), int32: steps taken, the learning-rate schedule's argument.


def scale_by_proximal_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    r"""Turns ``direction + weight_decay * p`` into Adan's proximal (default) step.

    The official Adan applies weight decay as a proximal step,
    :math:`p_{t+1} = (p_t - \eta_t u_t) / (1 + \eta_t \lambda)`. Given the incoming update
    :math:`u_t + \lambda p_t` (from :func:`optax.add_decayed_weights`), this scales it by
    :math:`-\eta_t / (1 + \eta_t \lambda)`, which yields exactly that step. Leaves that the mask
    excludes from decay are scaled by :math:`-\eta_t` alone.

    Args:
      learning_rate: a float or an optax schedule of the step count.
      weight_decay: the decay rate :math:`\lambda`; >= 0.
      weight_decay_mask: a tree of booleans like the params (or a callable returning one):
        True where decay applies. None means everywhere.

    Returns:
      An :class:`optax.GradientTransformation`.
    """
    _checks.check_learning_rate(learning_rate)
    _checks.check_interval("weight_decay", weight_decay, 0.0)

    def init_fn(params):
        del params
        return ScaleByProximalLearningRateState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        proximal_factor = -lr / (1 + lr * weight_decay)
        mask = _tree.resolve_mask(weight_decay_mask, updates if params is None else params)

        def scale_subtree(decayed, subtree):
            factor = proximal_factor if decayed else -lr
            return jax.tree.map(lambda u: (u * factor).astype(u.dtype), subtree)

        updates = jax.tree.map(scale_subtree, mask, updates)
        return updates, ScaleByProximalLearningRateState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
