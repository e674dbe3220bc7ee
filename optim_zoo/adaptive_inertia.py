"""Adai's adaptive per-element inertia (Xie et al. 2022), as the official code computes it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _tree


class ScaleByAdaptiveInertiaState(NamedTuple):
    """State of :func:`scale_by_adaptive_inertia`."""

    count: jax.Array  # shape (), int32: updates taken so far.
    m: optax.Updates  # momentum with per-element inertia; parameter dtype.
    v: optax.Updates  # EMA of g**2; at least float32.
    beta1_prod: optax.Updates  # product of past per-element beta1, starts at one; >= float32.


def scale_by_adaptive_inertia(
    beta0: jax.typing.ArrayLike = 0.1,
    beta2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    dampening: jax.typing.ArrayLike = 1.0,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adai's momentum with adaptive per-element inertia.

    .. math::

      v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        \hat v_t = v_t / (1 - \beta_2^t), \qquad
        \bar v_t = \mathrm{mean}(\hat v_t) \text{ over every element of every leaf} \\
      \beta_{1,t} &= \mathrm{clip}\big(1 - \beta_0 (\hat v_t / \bar v_t)^{1/(3 - 2 d)},
        0, 1 - \epsilon\big) \\
      \Pi_t &= \Pi_{t-1} \beta_{1,t}, \qquad
        m_t = \beta_{1,t} m_{t-1} + (1 - \beta_{1,t})^{d} g_t \\
      u_t &= \beta_0^{1 - d}\, m_t / (1 - \Pi_t)

    with dampening :math:`d = 1` for Adai (then the exponents vanish) and :math:`d < 1` for the
    official AdaiV2. The first update is exactly the gradient. There is no epsilon in a
    denominator: Adai is SGD with adaptive momentum, so its learning rate is on SGD's scale.
    Where every gradient seen so far is zero (:math:`\bar v_t = 0`), :math:`\hat v / \bar v` is
    taken as 0 instead of the official code's NaN. No learning rate and no sign flip are applied.

    The mean :math:`\bar v_t` couples all leaves the transform sees. Under :func:`optax.masked` or
    :func:`optax.multi_transform` it covers only the leaves routed to this transform.

    Args:
      beta0: the inertia scale, >= 0 (no upper bound, as in the official code).
      beta2: decay of the squared-gradient EMA, in [0, 1).
      eps: keeps :math:`\beta_1 \le 1 - \epsilon`; >= 0.
      dampening: AdaiV2's dampening :math:`d`; 1 gives Adai.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, optim_zoo
      >>> tx = optax.chain(optim_zoo.scale_by_adaptive_inertia(), optax.scale(-0.1))
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(2 * params, state, params)
      >>> print(optax.apply_updates(params, updates))  # first step: plain SGD
      [ 0.8 -1.6]

    References:
      Xie et al., `Adaptive Inertia: Disentangling the Effects of Adaptive Learning Rate and
      Momentum <https://arxiv.org/abs/2006.15815>`_, ICML 2022; official code:
      https://github.com/zeke-xie/adaptive-inertia-adai (``adai_optim/adai.py``).

    Differences:
      Matches the official code, including its global mean over all parameters (the paper
      writes a mean without fixing its scope), except that an all-zero gradient history gives
      zero inertia ratio instead of NaN. optax has no Adai.
    """
    _checks.check_interval("beta0", beta0, 0.0)
    _checks.check_interval("beta2", beta2, 0.0, 1.0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("dampening", dampening, 0.0, 1.0, high_open=False)

    def init_fn(params: optax.Params) -> ScaleByAdaptiveInertiaState:
        def stats_like(p, fill):
            return jnp.full_like(p, fill, dtype=_checks.stats_dtype(p.dtype))

        return ScaleByAdaptiveInertiaState(
            count=jnp.zeros([], jnp.int32),
            m=optax.tree.zeros_like(params),
            v=jax.tree.map(lambda p: stats_like(p, 0), params),
            beta1_prod=jax.tree.map(lambda p: stats_like(p, 1), params),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdaptiveInertiaState, params: Any = None
    ) -> tuple[optax.Updates, ScaleByAdaptiveInertiaState]:
        del params
        count = optax.safe_increment(state.count)

        def second_moment(g, v):
            dtype = v.dtype
            g_ = g.astype(dtype)
            return beta2 * v + (1 - beta2) * jnp.square(g_)

        v = jax.tree.map(second_moment, updates, state.v)
        v_leaves = jax.tree.leaves(v)
        num_elements = sum(x.size for x in v_leaves)
        mean_dtype = jnp.result_type(*v_leaves) if v_leaves else jnp.float32
        total = sum((jnp.sum(x) for x in v_leaves), jnp.zeros([], mean_dtype))
        bias_correction = 1 - beta2 ** count.astype(mean_dtype)
        v_bar = total / bias_correction / max(num_elements, 1)

        def leaf_update(g, m, v, beta1_prod):
            dtype = v.dtype  # Compute in the statistics dtype, at least float32.
            v_hat = v / (1 - beta2 ** count.astype(dtype))
            # All-zero history: v_hat is zero too, so a zero ratio gives the largest inertia.
            ratio = jnp.where(v_bar > 0, v_hat / jnp.where(v_bar > 0, v_bar, 1), 0).astype(dtype)
            beta1 = jnp.clip(1 - beta0 * ratio ** (1 / (3 - 2 * dampening)), 0, 1 - eps)
            beta1_prod = beta1_prod * beta1
            # g also feeds v and so the global mean: its own copy here keeps a computed g (as
            # with L2 decay) out of a temporary buffer.
            g_ = _tree.unshared(g.astype(dtype), state.count < 0)
            m = beta1 * m.astype(dtype) + (1 - beta1) ** dampening * g_
            # 1 - prod is 0 only when eps = 0 and beta1 has been 1 since step 1: m is 0 there.
            bias_correction = 1 - beta1_prod
            safe_correction = jnp.where(bias_correction == 0, 1, bias_correction)
            direction = m / safe_correction * beta0 ** (1 - dampening)
            return direction.astype(g.dtype), m, beta1_prod

        direction, m, beta1_prod = _tree.map_leaves(
            leaf_update, 3, updates, state.m, v, state.beta1_prod
        )
        new_state = ScaleByAdaptiveInertiaState(
            count=count,
            m=optax.tree.cast_like(m, state.m),
            v=optax.tree.cast_like(v, state.v),
            beta1_prod=optax.tree.cast_like(beta1_prod, state.beta1_prod),
        )
        return direction, new_state

    return optax.GradientTransformation(init_fn, update_fn)
