"""Apollo's rectified diagonal quasi-Newton direction (Ma 2020), as its official code computes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _dtypes, _fusion, _shards, _tree

# The official code's constant rebound: the smallest curvature the direction divides by.
CONSTANT_REBOUND = 0.01

# Tells this transform's random rounding bits from those of others chained with it.
_SALT = 3


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
      dtype_second_moment: dtype the Hessian estimate ``B`` is stored in; None means float32,
        or the parameter's dtype when it is wider. The arithmetic runs in at least float32
        whatever the storage.
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
    # A literal zero decay needs neither params nor a read of them.
    no_decay = _checks.is_literal_zero(weight_decay)
    dtype_momentum = _checks.check_dtype("dtype_momentum", dtype_momentum)
    dtype_second_moment = _checks.check_second_moment_dtype(dtype_second_moment)
    _checks.check_state_rounding(state_rounding, state_rounding_seed)

    name = "scale_by_rectified_diag_hessian"

    def init_fn(params: optax.Params) -> ScaleByRectifiedDiagHessianState:
        return ScaleByRectifiedDiagHessianState(
            count=jnp.zeros([], jnp.int32),
            m=_tree.first_moment_zeros(params, dtype_momentum),
            hessian_diag=_tree.second_moment_zeros(params, dtype_second_moment),
            direction=_tree.first_moment_zeros(params, dtype_momentum),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByRectifiedDiagHessianState, params: Any = None
    ) -> tuple[optax.Updates, ScaleByRectifiedDiagHessianState]:
        if params is None:
            if not no_decay:
                raise ValueError(f"{name} needs params for weight decay.")
            params = updates
        _shards.check_whole_leaves(
            jax.tree.leaves(updates), name, "the per-tensor sums", _shards.UNDER_JIT
        )
        count = optax.safe_increment(state.count)
        never = _fusion.never_true(state.count)
        decayed = _tree.decayed_leaves(weight_decay_mask, params, not no_decay)
        rounding = _dtypes.StateRounding(state_rounding, state_rounding_seed, count, _SALT)

        def leaf_update(g, m, hessian, direction, p, decayed, path, index):
            store = rounding.for_leaf(path).store
            m_dtype, hessian_dtype, direction_dtype = m.dtype, hessian.dtype, direction.dtype
            out_dtype = g.dtype
            dtype = _dtypes.compute_dtype(g.dtype, m_dtype, hessian_dtype)
            t = count.astype(dtype)
            alpha = (1 - beta) / (1 - beta**t)
            g_for_sum = g
            if l2 and decayed:
                # As optax.add_decayed_weights, in the gradient's dtype; the secant sum reads
                # the same values spelled its own way, computed from g and p in its loop.
                g_for_sum = _fusion.decayed_for_reduction(
                    g, p, weight_decay, _fusion.never_true(state.count, index)
                )
                g = g + weight_decay * p
            # Each reduction widens the state it reads in its own loop (a no-op unless the
            # state is stored narrower than the arithmetic).
            d_norm, d_grad, d_hess = _fusion.widened_for_reductions(direction, dtype, 3)
            m_max, m_grad = _fusion.widened_for_reductions(m, dtype, 2)
            (h_hess,) = _fusion.widened_for_reductions(hessian, dtype, 1)
            g_, m_, direction = g.astype(dtype), m.astype(dtype), direction.astype(dtype)
            grad_diff = g_ - m_
            if belief:
                sigma = jnp.max(jnp.abs(m_max - g_), initial=0)
                e = eps
            else:
                sigma = CONSTANT_REBOUND
                e = eps / CONSTANT_REBOUND
            norm4 = jnp.sum(jnp.square(jnp.square(d_norm))) ** 0.25 + e
            # The two sums of the secant update, sum(grad_diff / norm4 * unit) and
            # sum(hessian * unit**2), with the scalar 1 / norm4**2 taken out (equal up to
            # rounding). Each reads the state directly, with no intermediate shared with
            # the elementwise updates, which XLA would keep in a buffer as large as the leaf.
            grad_dot = jnp.sum(g_for_sum.astype(dtype) * d_grad - m_grad * d_grad)
            hessian_dot = jnp.sum(h_hess * d_hess * d_hess)
            delta = -(alpha * grad_dot + hessian_dot) / jnp.square(norm4)
            # The direction reads m and B as stored (a no-op unless stored narrower).
            m = store(m_ + alpha * grad_diff, m_dtype, 0)
            narrow = direction_dtype != dtype
            if narrow:
                # m is overwritten (in place, when donated) once the sums (and belief's
                # maximum) have read the old m.
                m = _fusion.written_after(m, never, delta, *([sigma] if belief else []))
            unit = direction / norm4
            unit_sq = jnp.square(unit)
            hessian = store(hessian.astype(dtype) + delta * unit_sq, hessian_dtype, 1)
            decay = None
            if decayed and not l2:
                decay = weight_decay
                if stable:
                    # The same curvature, spelled so that the mean computes it in its own loop
                    # (belief's e / alpha is the mean's own scalar too).
                    own = _fusion.never_true(state.count, index)
                    (for_mean,) = _fusion.widened_for_reductions(hessian, dtype, 1)
                    rebounded = _fusion.rebounded_for_reduction(for_mean, sigma, own)
                    if belief:
                        rebounded = rebounded + _fusion.own_scalar(e / alpha, own)
                    decay = decay / jnp.mean(rebounded)

            def new_direction(m, hessian):
                curvature = jnp.maximum(jnp.abs(hessian.astype(dtype)), sigma)
                if belief:
                    curvature = curvature + e / alpha
                direction = m.astype(dtype) / curvature
                return direction if decay is None else direction + decay * p.astype(dtype)

            if not narrow:
                direction = new_direction(m, hessian)
                # XLA computes the new m again in the direction's loop, from the old m: m is
                # overwritten (in place, when donated) once the direction exists.
                m = _fusion.written_after(m, never, direction)
                return direction.astype(out_dtype), m, hessian, direction
            # Stored narrower, the direction is computed twice, for the update and to be stored,
            # each from m and B as stored, read from memory (computed in its loop, the new m
            # would read the old m after it is overwritten): one shared value would be written
            # out as large as the leaf.
            for_direction = _fusion.apart((m, hessian))
            direction = new_direction(*for_direction)
            stored_direction = store(
                new_direction(*_fusion.apart(for_direction)), direction_dtype, 2
            )
            if decay is not None:
                # Both read p: the update (which overwrites p, when donated) comes after.
                direction = _fusion.written_after(direction, never, stored_direction)
            return direction.astype(out_dtype), m, hessian, stored_direction

        out, m, hessian, direction = _tree.map_leaves(
            leaf_update,
            4,
            name,
            updates,
            state.m,
            state.hessian_diag,
            state.direction,
            params,
            decayed,
            _tree.leaf_paths(updates),
            _tree.leaf_indices(updates),
        )
        treedef = jax.tree.structure(updates)
        new_state = ScaleByRectifiedDiagHessianState(
            count=count,
            m=optax.tree.cast_like(treedef.unflatten(m), state.m),
            hessian_diag=optax.tree.cast_like(treedef.unflatten(hessian), state.hessian_diag),
            direction=optax.tree.cast_like(treedef.unflatten(direction), state.direction),
        )
        return treedef.unflatten(out), new_state

    return _tree.on_real_arrays(optax.GradientTransformation(init_fn, update_fn), name)
