"""Adafactor's primitive: updates rescaled by its factored estimate of the gradient's RMS."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _fusion, _leafwise, second_moment
from optim_zoo._leafwise import SECOND_MOMENT, Field
from optim_zoo.second_moment import FactoredSecondMoment, FactoringRule


class ScaleByFactoredRmsState(NamedTuple):
    """State of :func:`scale_by_factored_rms`: the step count and a factored second moment.

    The statistics are laid out as in :class:`optim_zoo.FactoredSecondMoment`: ``PerLeaf``
    tuples with one entry per parameter leaf and ``None`` where a leaf does not use that
    statistic, so a factored n x m matrix holds n + m floats. Keeping them out of the params'
    tree structure also keeps wrappers that carry a parameter's sharding metadata (as Flax NNX
    variables do) off the reduced statistics, which have one axis fewer. On a device mesh each
    statistic is sharded like its parameter without the reduced axis.
    """

    count: jax.Array  # shape (), int32: updates taken so far.
    v_row: tuple[jax.Array | None, ...]  # EMA of the mean of g**2 over axis b of each leaf.
    v_col: tuple[jax.Array | None, ...]  # EMA of the mean of g**2 over axis a.
    v: tuple[jax.Array | None, ...]  # full EMA of g**2, for leaves not factored.


def scale_by_factored_rms(
    *,
    factored: bool = True,
    decay_rate: jax.typing.ArrayLike = 0.8,
    decay_offset: jax.typing.ArrayLike = 0,
    min_dim_size_to_factor: int = 128,
    eps: jax.typing.ArrayLike = 1e-30,
    factoring: FactoringRule = "largest_two",
    decay: jax.typing.ArrayLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adafactor's (factored) estimate of the gradient's RMS.

    With :math:`c` the number of earlier updates,
    :math:`\beta_c = 1 - (\max(c - \mathrm{decay\_offset}, 0) + 1)^{-\mathrm{decay\_rate}}` (zero
    on the first step), or the constant ``decay`` when it is given (CAME's :math:`\beta_2`), and
    :math:`G = g^2 + \epsilon`. For a leaf factored over axes
    :math:`(a, b)` (:func:`optim_zoo.factored_dims`),

    .. math::

      R_t &= \beta_c R_{t-1} + (1 - \beta_c)\, \mathrm{mean}_b(G) \\
      C_t &= \beta_c C_{t-1} + (1 - \beta_c)\, \mathrm{mean}_a(G) \\
      u_t &= g \,/\, \sqrt{(R_t / \mathrm{mean}_a(R_t)) \otimes C_t}

    and for any other leaf :math:`V_t = \beta_c V_{t-1} + (1 - \beta_c) G`,
    :math:`u_t = g / \sqrt{V_t}`. Statistics are stored in ``dtype_second_moment`` (default: at
    least float32); the arithmetic runs in at least float32 whatever the storage. No clipping,
    learning rate, parameter scale or sign flip is applied: :func:`optim_zoo.adafactor` chains
    those. Every argument is keyword-only; the order is optax's. Inside :func:`jax.shard_map`, a
    factored leaf split over its axes raises a ``ValueError`` (its means would be one
    device's); compute the update under :func:`jax.jit` with sharded arrays instead.

    Args:
      factored: whether to factor at all.
      decay_rate: exponent of the second-moment decay schedule, > 0 (0.8 in the paper; values
        above 1 are accepted, as tensor2tensor and optax do).
      decay_offset: step at which the decay schedule restarts (for fine-tuning), >= 0; earlier
        steps, as on a fresh state with a positive offset, count as the first.
      min_dim_size_to_factor: with the default rule, factor a leaf only when the smaller of its
        two largest axes has at least this many elements; 0 factors every leaf of rank >= 2
        over its two largest axes.
      eps: added to the squared gradient; >= 0.
      factoring: which axes to factor: ``"largest_two"`` (the default, as optax),
        ``"last_two"`` (every leaf of rank >= 2 over its last two axes, as tensor2tensor), or
        a callable ``(path, shape) -> (a, b) | None``; see :mod:`optim_zoo.second_moment`.
      decay: a constant decay in [0, 1) instead of the schedule (then ``decay_rate`` and
        ``decay_offset`` are not used), as CAME keeps its second moment.
      dtype_second_moment: dtype the statistics are stored in; None means float32, or the
        parameter's dtype when it is wider.
        ``jnp.uint8``: 8-bit codes for full statistics; factored ones, small, keep float32.
      state_rounding: how statistics stored narrower than the arithmetic are rounded:
        ``"nearest"`` (default) or ``"stochastic"`` (unbiased; see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the seed of the rounding, an integer in
        [0, 2**32); the bits also depend on the step count, so a resumed run continues exactly.

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
      tensor2tensor factors the last two axes of every leaf of rank >= 2
      (``factoring="last_two"``); by default this factors the two largest, as
      ``optax.scale_by_factored_rms`` does: the same for matrices, where the factored update is
      symmetric in the two axes, but other axes for most 4-D convolution kernels. Unlike optax,
      statistics stay in float64 for float64 parameters, the decay is computed in the
      arithmetic's dtype, and unfactored leaves carry no placeholder state. Steps before
      ``decay_offset`` count as the first (decay 0) where tensor2tensor and optax raise a
      negative number to a fractional power (NaN). Row statistics whose mean overflows to
      infinity give an infinite estimate and a zero update (tensor2tensor: inf / inf = NaN); in
      float32, as in the official code, ``g**2`` overflows at ``|g|`` ~ 1e19. A complex leaf is
      trained as its real and imaginary parts (PyTorch's convention; optax keeps one statistic
      of ``|g|**2`` per complex element), stacked on a new first axis, so a complex vector is a
      two-row matrix here. With ``eps`` 0 (or traced), a zero gradient over a zero statistic
      gives a zero step where tensor2tensor and optax give 0 / 0 = NaN.
    """
    layout = second_moment.checked_factoring(factored, min_dim_size_to_factor, factoring)
    _checks.check_interval("decay_rate", decay_rate, 0.0, low_open=True)
    _checks.check_interval("decay_offset", decay_offset, 0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("decay", decay, 0.0, 1.0, allow_none=True)
    name = "scale_by_factored_rms"

    def decay_at(count: jax.Array, dtype: jnp.dtype) -> jax.typing.ArrayLike:
        if decay is not None:
            return decay
        # Steps before decay_offset (a fresh state with an offset) count as the first.
        step = (jnp.maximum(count - decay_offset, 0) + 1).astype(dtype)
        return 1 - step ** (-jnp.asarray(decay_rate, dtype))

    zero_eps = _checks.may_be_zero(eps)

    def leaf_math(leaf: _leafwise.Leaf) -> jax.Array:
        g, v = leaf.g.astype(leaf.dtype), leaf.old("v")
        means = _fusion.mean_squares(g, v.axes)  # each mean squares g on its own (steering)
        v = leaf.store("v", v.accumulate(g, decay_at(leaf.earlier_steps, leaf.dtype), eps, means))
        row_factor, col_factor = v.factors(jax.lax.rsqrt)
        scaled = g * row_factor * col_factor
        if zero_eps:  # a zero gradient over a zero second moment: a zero step, not 0 / 0
            scaled = jnp.where(g == 0, g, scaled)
        return scaled

    return _leafwise.transform(
        name,
        ScaleByFactoredRmsState,
        (Field("v", SECOND_MOMENT),),
        lambda step: step.map(leaf_math),
        _leafwise.storage(None, dtype_second_moment, state_rounding, state_rounding_seed),
        factoring=layout,
        to_state=lambda count, values: ScaleByFactoredRmsState(count, *values["v"]),
        from_state=lambda state: {"v": FactoredSecondMoment(state.v_row, state.v_col, state.v)},
    )
