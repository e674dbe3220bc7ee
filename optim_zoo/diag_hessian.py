"""Apollo's rectified diagonal quasi-Newton direction (Ma 2020), as its official code computes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _fusion, _leafwise
from optim_zoo._leafwise import MOMENTUM, STATISTIC, Field

# The official code's constant rebound: the smallest curvature the direction divides by.
CONSTANT_REBOUND = 0.01


class ScaleByRectifiedDiagHessianState(NamedTuple):
    """State of :func:`scale_by_rectified_diag_hessian`."""

    count: jax.Array  # shape (), int32: updates taken so far.
    m: optax.Updates  # bias-corrected EMA of gradients; dtype_momentum (default: param dtype).
    hessian_diag: optax.Updates  # diagonal Hessian estimate B; dtype_second_moment (>= f32).
    direction: optax.Updates  # previous direction d (decoupled decay included); as m.


def scale_by_rectified_diag_hessian(
    beta: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-4,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    rebound: str = "constant",
    weight_decay_type: str = "decoupled",
    weight_decay_mask: Any = None,
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformation:
    r"""Rescales updates by Apollo's rectified diagonal quasi-Newton Hessian estimate.

    Per leaf, with :math:`\alpha_t = (1 - \beta) / (1 - \beta^t)`,
    :math:`\delta g = g_t - m_{t-1}`, and every norm and sum taken over the leaf alone:

    .. math::

      m_t &= m_{t-1} + \alpha_t\, \delta g \\
      \hat d &= d_{t-1} / (\lVert d_{t-1} \rVert_4 + e) \\
      \delta &= -\alpha_t \textstyle\sum \frac{\delta g}{\lVert d_{t-1} \rVert_4 + e} \hat d
               - \sum B_{t-1} \hat d^2 \\
      B_t &= B_{t-1} + \delta\, \hat d^2 \\
      D_t &= \max(|B_t|, \sigma)\ [+\, e / \alpha_t \text{ for belief}] \\
      d_t &= m_t / D_t + w\, p_t

    with :math:`g_t` replaced by :math:`g_t + \lambda p_t` first for L2 decay (then
    :math:`w = 0`). Constant rebound: :math:`\sigma = 0.01`, :math:`e = \epsilon / 0.01`. Belief
    rebound: :math:`\sigma = \lVert \delta g \rVert_\infty`, :math:`e = \epsilon`. Decoupled
    decay uses :math:`w = \lambda`, stable decay :math:`w = \lambda / \mathrm{mean}(D_t)`. The
    output is
    :math:`d_t`; it is also stored, decay included, for the next secant update, which is why
    decoupled decay lives here rather than in :func:`optax.add_decayed_weights`. No learning rate
    and no sign flip are applied. L2 decay (the official default for constant rebound) gives
    what :func:`optax.add_decayed_weights` chained before this transform gives, bit for bit; done
    here, the secant sum computes :math:`g_t + \lambda p_t` from :math:`g_t` and :math:`p_t` in its
    own loop instead of reading it from a temporary as large as the leaf.

    Every sum is over a whole leaf: inside :func:`jax.shard_map` a leaf split over its axes (or
    differing between their devices) raises a ``ValueError``; compute the update under
    :func:`jax.jit` with sharded arrays instead, where XLA sums across the devices.

    Args:
      beta: decay of the gradient EMA, in [0, 1).
      eps: the official ``eps``, > 0: the first step divides the zero initial direction by its
        4-norm plus :math:`e`, which is 0 / 0 at ``eps = 0`` for every gradient.
      weight_decay: L2, decoupled or stable decay rate :math:`\lambda`, >= 0.
      rebound: ``'constant'`` or ``'belief'``.
      weight_decay_type: ``'L2'``, ``'decoupled'`` or ``'stable'``.
      weight_decay_mask: a tree of booleans like the params (or a callable returning one):
        True where decay applies. None means everywhere.
      dtype_momentum: dtype ``m`` and the direction are stored in; None means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the Hessian estimate ``B`` is stored in; None means float32,
        or the parameter's dtype when it is wider. The arithmetic runs in at least float32
        whatever the storage.
        ``jnp.uint8``: 8-bit codes, signed as ``B`` takes both signs (:func:`optim_zoo.adan`).
      state_rounding: how state stored narrower than the arithmetic is rounded:
        ``"nearest"`` (default) or ``"stochastic"`` (unbiased; see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the seed of the rounding, an integer in
        [0, 2**32); the bits also depend on the step count, so a resumed run continues exactly.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, optim_zoo
      >>> tx = optax.chain(optim_zoo.scale_by_rectified_diag_hessian(), optax.scale(-1e-3))
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(2 * params, state, params)
      >>> new_params = optax.apply_updates(params, updates)  # first step: p - 1e-3 g / 0.01
      >>> print([round(x, 4) for x in new_params.tolist()])
      [0.8, -1.6]

    References:
      Ma, `Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for Nonconvex
      Stochastic Optimization <https://arxiv.org/abs/2009.13586>`_, 2020; official code:
      https://github.com/XuezheMax/apollo (``optim/apollo.py``).

    Differences:
      The paper's Algorithm 1 bias-corrects the gradient EMA separately and rectifies with
      :math:`\max(|B|, \sigma)` for a fixed :math:`\sigma = 1`; this follows the official code
      (running bias-corrected average, :math:`\sigma = 0.01`, ``eps`` folded into the 4-norm, the
      belief variant, and decay stored in the direction). Not the 2024 low-rank "APOLLO" of Zhu
      et al., a different algorithm. optax has no Apollo. A complex leaf is trained as its
      real and imaginary parts (PyTorch's convention): its norms and sums count each part as
      one real number.
    """
    _checks.check_interval("beta", beta, 0.0, 1.0)
    # At eps = 0 the first step divides the zero direction by its 4-norm: 0 / 0.
    _checks.check_interval("eps", eps, 0.0, low_open=True)
    _checks.check_interval("weight_decay", weight_decay, 0.0)
    _checks.check_choice("rebound", rebound, ("constant", "belief"))
    _checks.check_choice("weight_decay_type", weight_decay_type, ("L2", "decoupled", "stable"))
    _checks.check_not_scheduled("weight_decay_mask", weight_decay_mask)
    belief = rebound == "belief"
    stable = weight_decay_type == "stable"
    l2 = weight_decay_type == "L2"
    options = _leafwise.storage(
        dtype_momentum, dtype_second_moment, state_rounding, state_rounding_seed
    )

    def rectified(b: jax.Array, sigma: Any, e_alpha: Any, for_mean: bool = False) -> jax.Array:
        """D = max(|B|, sigma), + e / alpha for belief; `for_mean`: spelled for a mean's loop."""
        if for_mean:
            curvature = _fusion.rebounded_for_reduction(b, sigma)
            return curvature + _fusion.own_scalar(e_alpha) if belief else curvature
        curvature = jnp.maximum(jnp.abs(b), sigma)
        return curvature + e_alpha if belief else curvature

    def leaf_math(leaf: _leafwise.Leaf) -> jax.Array:
        p, dtype = leaf.p, leaf.dtype
        alpha = (1 - beta) / (1 - beta**leaf.t)
        g = g_for_sum = leaf.g
        if l2 and leaf.decayed:  # as optax.add_decayed_weights, in the gradient's dtype
            g, g_for_sum = g + weight_decay * p, _fusion.decayed_for_reduction(g, p, weight_decay)
        g, m, d, b = g.astype(dtype), *(leaf.old(f) for f in ("m", "direction", "hessian_diag"))
        # The per-tensor sums, each reading the state in its own loop.
        d_norm, d_grad, d_hess = leaf.old_for_reductions("direction", 3)
        m_max, m_grad = leaf.old_for_reductions("m", 2)
        (b_hess,) = leaf.old_for_reductions("hessian_diag", 1)
        if belief:  # the rebound: the smallest curvature divided by, and the norm's epsilon
            sigma, e = jnp.max(jnp.abs(m_max - g), initial=0), eps
        else:
            sigma, e = CONSTANT_REBOUND, eps / CONSTANT_REBOUND
        e_alpha = e / alpha  # belief adds it to the curvature
        norm4 = leaf.sum(jnp.square(jnp.square(d_norm)), "direction") ** 0.25 + e
        # sum(dg / norm4 * d_hat) and sum(B * d_hat**2), 1 / norm4**2 taken out of both.
        grad_dot = leaf.sum(g_for_sum.astype(dtype) * d_grad - m_grad * d_grad, "m", "direction")
        b_dot = leaf.sum(b_hess * d_hess * d_hess, "hessian_diag", "direction")
        delta = -(alpha * grad_dot + b_dot) / jnp.square(norm4)
        narrow = leaf.stored("direction").dtype != dtype
        # Stored narrower, m is overwritten once the sums have read the old m.
        after = ((delta, sigma) if belief else (delta,)) if narrow else ()
        leaf.store("m", m + alpha * (g - m), after=after)
        leaf.store("hessian_diag", b + delta * jnp.square(d / norm4))
        w = weight_decay if leaf.decayed and not l2 else None
        if w is not None and stable:  # w / mean(D_t), the mean in its own loop
            (b_new,) = _fusion.widened_for_reductions(leaf.new("hessian_diag"), dtype, 1)
            w = w / jnp.mean(rectified(b_new, sigma, e_alpha, for_mean=True))

        def new_direction(m: jax.Array, b: jax.Array) -> jax.Array:
            direction = m.astype(dtype) / rectified(b.astype(dtype), sigma, e_alpha)
            return direction if w is None else direction + w * p.astype(dtype)

        return _stored_direction(leaf, new_direction, narrow, w is not None)

    return _leafwise.transform(
        "scale_by_rectified_diag_hessian",
        ScaleByRectifiedDiagHessianState,
        (Field("m", MOMENTUM), Field("hessian_diag", STATISTIC), Field("direction", MOMENTUM)),
        lambda step: step.map(leaf_math),
        options,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        whole_leaves="the per-tensor sums",
    )


def _stored_direction(
    leaf: _leafwise.Leaf, new_direction: Any, narrow: bool, reads_params: bool
) -> jax.Array:
    """The new direction from the new m and B, stored as the state and returned as the update.

    As wide as the arithmetic, it is computed once and m is overwritten (in place, when
    donated) only after it, as XLA computes the new m again in the direction's loop from the
    old m. Stored narrower, it is computed twice, for the update and to be stored, each from
    m and B read from memory (``_fusion.computed_twice``; one shared value would be written
    out as large as the leaf), and the update, which may overwrite the params, comes after the
    stored direction where both read them.
    """
    m, b = leaf.new("m"), leaf.new("hessian_diag")
    if not narrow:
        direction = new_direction(m, b)
        leaf.store("direction", direction)
        leaf.write_after("m", direction)
        return direction
    for_update, for_state = _fusion.computed_twice(new_direction, m, b)
    leaf.store("direction", for_state)
    if reads_params:
        for_update = _fusion.written_after(for_update, leaf.new("direction"))
    return for_update
