"""Adan's Nesterov moment estimate, and the two building blocks the official Adan wraps it in."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _tree


class ScaleByNesterovMomentState(NamedTuple):
    """State of :func:`scale_by_nesterov_moment`."""

    count: jax.Array  # shape (), int32: updates taken so far.
    m: optax.Updates  # EMA of gradients; parameter dtype.
    v: optax.Updates  # EMA of gradient differences g_t - g_{t-1}; parameter dtype.
    n: optax.Updates  # EMA of (g_t + b2 * diff_t)**2; at least float32.
    prev_grad: optax.Updates  # gradient of the previous step; parameter dtype.


def scale_by_nesterov_moment(
    b1: jax.typing.ArrayLike = 0.98,
    b2: jax.typing.ArrayLike = 0.92,
    b3: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
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

    Args:
      b1: decay of the gradient EMA, in [0, 1).
      b2: decay of the gradient-difference EMA, and the weight of the difference in ``n``;
        in [0, 1).
      b3: decay of the squared Nesterov gradient EMA, in [0, 1).
      eps: added to the denominator, outside the square root; >= 0.
      eps_root: added inside the square root; >= 0.

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
    """
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        _checks.check_interval(name, value, 0.0, 1.0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("eps_root", eps_root, 0.0)

    def init_fn(params: optax.Params) -> ScaleByNesterovMomentState:
        return ScaleByNesterovMomentState(
            count=jnp.zeros([], jnp.int32),
            m=optax.tree.zeros_like(params),
            v=optax.tree.zeros_like(params),
            n=jax.tree.map(lambda p: jnp.zeros_like(p, _checks.stats_dtype(p.dtype)), params),
            prev_grad=optax.tree.zeros_like(params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByNesterovMomentState, params: Any = None
    ) -> tuple[optax.Updates, ScaleByNesterovMomentState]:
        del params
        count = optax.safe_increment(state.count)
        is_first = state.count == 0

        def leaf_update(g, m, v, n, prev_grad):
            dtype = n.dtype  # Compute in the statistics dtype, at least float32.
            t = count.astype(dtype)
            g_ = g.astype(dtype)
            # The official code starts prev_grad at the first gradient: no difference on step 1.
            diff = jnp.where(is_first, jnp.zeros_like(g_), g_ - prev_grad.astype(dtype))
            m = b1 * m.astype(dtype) + (1 - b1) * g_
            v = b2 * v.astype(dtype) + (1 - b2) * diff
            n = b3 * n + (1 - b3) * jnp.square(g_ + b2 * diff)
            numerator = m / (1 - b1**t) + b2 * v / (1 - b2**t)
            direction = numerator / (jnp.sqrt(n / (1 - b3**t) + eps_root) + eps)
            return direction.astype(g.dtype), m, v, n

        direction, m, v, n = _tree.map_leaves(
            leaf_update, 4, updates, state.m, state.v, state.n, state.prev_grad
        )
        v = optax.tree.cast_like(v, state.v)
        n = optax.tree.cast_like(n, state.n)
        # v and n read the old prev_grad: overwrite it (in place, when donated) only after them.
        prev_grad = jax.tree.map(
            lambda g, v, n: _tree.ordered_after(g, state.count < 0, v, n),
            optax.tree.cast_like(updates, state.prev_grad),
            v,
            n,
        )
        new_state = ScaleByNesterovMomentState(
            count=count, m=optax.tree.cast_like(m, state.m), v=v, n=n, prev_grad=prev_grad
        )
        return direction, new_state

    return optax.GradientTransformation(init_fn, update_fn)


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

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


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
