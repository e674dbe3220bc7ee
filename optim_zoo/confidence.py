"""CAME's primitive: momentum scaled by its confidence, as the official code computes it."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _leafwise, second_moment
from optim_zoo._leafwise import MOMENTUM, SECOND_MOMENT, Field
from optim_zoo.second_moment import FactoredSecondMoment, FactoringRule


class ScaleByConfidenceState(NamedTuple):
    """State of :func:`scale_by_confidence`."""

    count: jax.Array  # shape (), int32: updates taken so far (the stochastic rounding's clock).
    m: optax.Updates  # EMA of the incoming updates; dtype_momentum (default: parameter dtype).
    # Factored EMA of the instability (u - m)**2, laid out as a FactoredSecondMoment with
    # nothing for leaves that are not factored; dtype_second_moment (default: >= float32).
    instability: FactoredSecondMoment


def scale_by_confidence(
    b1: jax.typing.ArrayLike = 0.9,
    b3: jax.typing.ArrayLike = 0.9999,
    eps_confidence: jax.typing.ArrayLike = 1e-16,
    *,
    factoring: FactoringRule = "last_two",
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformation:
    r"""Scales a momentum of the updates by CAME's confidence in it.

    With :math:`u_t` the incoming update (in CAME, Adafactor's clipped update), per leaf
    factored over axes :math:`(a, b)` (by default its last two, as the official code):

    .. math::

      m_t &= b_1 m_{t-1} + (1 - b_1) u_t \\
      r_t &= (u_t - m_t)^2 + \epsilon_{conf} \\
      R_t &= b_3 R_{t-1} + (1 - b_3)\, \mathrm{mean}_b(r_t), \qquad
      C_t = b_3 C_{t-1} + (1 - b_3)\, \mathrm{mean}_a(r_t) \\
      s_t &= m_t \,/\, \sqrt{(R_t / \mathrm{mean}_a(R_t)) \otimes C_t}

    and for a leaf that is not factored (rank < 2) :math:`s_t = m_t`, with no statistic. Where
    the update strays far from its momentum (the instability :math:`r` is large) the step is
    small. No bias correction, as in the official code; no learning rate and no sign flip are
    applied. The arithmetic runs in at least float32 whatever the storage. Inside
    :func:`jax.shard_map`, a factored leaf split over its axes raises a ``ValueError`` (its
    means would be one device's); compute the update under :func:`jax.jit` with sharded arrays
    instead.

    Args:
      b1: decay of the momentum, in [0, 1).
      b3: decay of the instability statistics, in [0, 1).
      eps_confidence: added to the instability before its means; >= 0.
      factoring: which axes to factor: ``"last_two"`` (the default, the official code's),
        ``"largest_two"`` or a callable ``(path, shape) -> (a, b) | None``
        (:mod:`optim_zoo.second_moment`); ``min_dim_size_to_factor`` is 0.
      dtype_momentum: dtype ``m`` is stored in; None means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the instability statistics are stored in; None means float32,
        or the parameter's dtype when it is wider.
        ``jnp.uint8``: 8-bit codes for full statistics; factored ones, small, keep float32.
      state_rounding: how state stored narrower than the arithmetic is rounded:
        ``"nearest"`` (default) or ``"stochastic"`` (unbiased; see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the seed of the rounding, an integer in
        [0, 2**32); the bits also depend on the step count, so a resumed run continues exactly.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, optim_zoo
      >>> tx = optax.chain(optim_zoo.scale_by_confidence(), optax.scale(-0.1))
      >>> params = jnp.array([[1.0, -2.0], [0.5, 3.0]])
      >>> state = tx.init(params)
      >>> [x.shape for x in state[0].instability.v_row + state[0].instability.v_col]
      [(2,), (2,)]
      >>> updates, state = tx.update(jnp.sign(params), state, params)
      >>> # m = 0.1 u and r = 0.81 everywhere: s = m / sqrt(1e-4 * 0.81), no bias correction.
      >>> print([round(x, 3) for x in updates.ravel().tolist()])
      [-1.111, 1.111, -1.111, -1.111]

    References:
      Luo et al., `CAME: Confidence-guided Adaptive Memory Efficient Optimization
      <https://arxiv.org/abs/2307.02047>`_, ACL 2023; official code:
      https://github.com/yangluo7/CAME (``came_pytorch/CAME.py``).

    Differences:
      The paper's Algorithm 1 writes the same update; this follows the official code, which
      adds ``eps_confidence`` before the means. Like the official code it factors the last two
      axes of every leaf of rank >= 2, whatever their sizes. Its rank-one estimate is taken as
      zero where :math:`\mathrm{mean}_a(R) = 0` and as infinite where it overflows (the step is
      then zero), instead of the official code's NaN. With ``eps_confidence`` 0 (or traced), a
      zero momentum over a zero instability gives a zero step instead of 0 / 0 = NaN. optax has
      no CAME.
    """
    _checks.check_interval("b1", b1, 0.0, 1.0)
    _checks.check_interval("b3", b3, 0.0, 1.0)
    _checks.check_interval("eps_confidence", eps_confidence, 0.0)
    layout = second_moment.checked_factoring(True, 0, factoring)
    options = _leafwise.storage(
        dtype_momentum, dtype_second_moment, state_rounding, state_rounding_seed
    )

    zero_eps = _checks.may_be_zero(eps_confidence)

    def leaf_math(leaf: _leafwise.Leaf) -> jax.Array:
        u = leaf.g.astype(leaf.dtype)
        m = leaf.store("m", b1 * leaf.old("m") + (1 - b1) * u)
        r = leaf.old("instability")
        if r.is_empty:  # not factored: the momentum itself
            return m
        instability = u - m
        # Each mean squares the instability in a loop of its own (steering).
        means = leaf.mean_squares(lambda m: u - m, r.axes, "m")
        r = leaf.store("instability", r.accumulate(instability, b3, eps_confidence, means))
        row_factor, col_factor = r.factors(jax.lax.rsqrt)
        scaled = m * row_factor * col_factor
        if zero_eps:  # a zero momentum over a zero instability: a zero step, not 0 / 0
            scaled = jnp.where(m == 0, m, scaled)
        return scaled

    return _leafwise.transform(
        "scale_by_confidence",
        ScaleByConfidenceState,
        (Field("m", MOMENTUM), Field("instability", SECOND_MOMENT)),
        lambda step: step.map(leaf_math),
        options,
        factoring=layout,
        factored_only=True,
        # In turns its 8-bit step took 1.06x as long on the 30M tree for the same temporaries
        # (docs/eight_bit_state.md, "Steps in turns").
        in_turns=False,
    )
