"""Adan's primitive: the Nesterov moment estimate, as the official code computes it."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _fusion, _leafwise, second_moment
from optim_zoo._leafwise import MOMENTUM, SECOND_MOMENT, Field
from optim_zoo.second_moment import FactoredSecondMoment, FactoringRule


class ScaleByNesterovMomentState(NamedTuple):
    """State of :func:`scale_by_nesterov_moment`."""

    count: jax.Array  # shape (), int32: updates taken so far.
    m: optax.Updates  # EMA of gradients; dtype_momentum (default: parameter dtype).
    v: optax.Updates  # EMA of gradient differences g_t - g_{t-1}; as m.
    # EMA of (g_t + b2 * diff_t)**2, like the params, or a FactoredSecondMoment when factored;
    # dtype_second_moment (default: at least float32).
    n: optax.Updates | FactoredSecondMoment
    prev_grad: optax.Updates  # gradient of the previous step; as m.


# In the order the update stores them.
FIELDS = (
    Field("m", MOMENTUM),
    Field("v", MOMENTUM),
    Field("n", SECOND_MOMENT),
    Field("prev_grad", MOMENTUM),
)


def scale_by_nesterov_moment(
    b1: jax.typing.ArrayLike = 0.98,
    b2: jax.typing.ArrayLike = 0.92,
    b3: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    factored: bool = False,
    min_dim_size_to_factor: int = 128,
    factoring: FactoringRule = "largest_two",
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
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
    Adafactor keeps its second moment (:mod:`optim_zoo.second_moment`): for a leaf factored
    over axes :math:`(a, b)` (:func:`optim_zoo.factored_dims`), EMAs :math:`R, C` (decay
    :math:`b_3`) of the mean of :math:`(g_t + b_2 \Delta_t)^2` over :math:`b` and over
    :math:`a`, and :math:`n_t = (R_t / \mathrm{mean}_a(R_t)) \otimes C_t` in the update; other
    leaves keep the full :math:`n`. An n x m matrix then stores three full states plus n + m
    floats, not four. Inside :func:`jax.shard_map`, a factored leaf split over its axes
    raises a ``ValueError`` (its means would be one device's); compute the update under
    :func:`jax.jit` with sharded arrays instead.

    Args:
      b1: decay of the gradient EMA, in [0, 1).
      b2: decay of the gradient-difference EMA, and the weight of the difference in ``n``;
        in [0, 1).
      b3: decay of the squared Nesterov gradient EMA, in [0, 1).
      eps: added to the denominator, outside the square root; >= 0.
      eps_root: added inside the square root; >= 0.
      factored: keep ``n`` factored where a leaf allows.
      min_dim_size_to_factor: with ``factored`` and the default rule, factor a leaf only when
        the smaller of its two largest axes has at least this many elements.
      factoring: with ``factored``, which axes to factor: ``"largest_two"`` (default),
        ``"last_two"`` or a callable ``(path, shape) -> (a, b) | None``
        (:mod:`optim_zoo.second_moment`).
      dtype_momentum: dtype ``m``, ``v`` and the previous gradient are stored in; None means
        the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype ``n`` is stored in; None means float32, or the parameter's
        dtype when it is wider. The arithmetic runs in at least float32 whatever the storage.
        ``jnp.uint8``: 8-bit codes with a scale per block (see :func:`optim_zoo.adan`).
      state_rounding: how state stored narrower than the arithmetic is rounded:
        ``"nearest"`` (default) or ``"stochastic"`` (unbiased; see
        :func:`optim_zoo.adan`). No effect on state as wide as the arithmetic.
      state_rounding_seed: with ``"stochastic"``, the seed of the rounding, an integer in
        [0, 2**32); the bits also depend on the step count, so a resumed run continues exactly.

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
      convention), each with its own moments. With ``eps`` and ``eps_root`` both 0 (or traced),
      a zero numerator over a zero ``n`` gives a zero step where the official code gives
      0 / 0 = NaN.
    """
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        _checks.check_interval(name, value, 0.0, 1.0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("eps_root", eps_root, 0.0)
    layout = second_moment.checked_factoring(factored, min_dim_size_to_factor, factoring)
    options = _leafwise.storage(
        dtype_momentum, dtype_second_moment, state_rounding, state_rounding_seed
    )

    zero_eps = _checks.may_be_zero(eps) and _checks.may_be_zero(eps_root)

    def leaf_math(leaf: _leafwise.Leaf) -> jax.Array:
        g, n, t = leaf.g.astype(leaf.dtype), leaf.old("n"), leaf.t
        # Factored, each mean of n computes g + b2 * diff in its own loop (steering).
        g_diff, means = _fusion.nesterov_for_means(
            g, leaf.stored("prev_grad"), b2, leaf.is_first, n.axes
        )
        # The official code starts prev_grad at the first gradient: no difference on step 1.
        diff = jnp.where(leaf.is_first, jnp.zeros_like(g), g_diff - leaf.old("prev_grad"))
        m = leaf.store("m", b1 * leaf.old("m") + (1 - b1) * g)
        v = leaf.store("v", b2 * leaf.old("v") + (1 - b2) * diff)
        n = leaf.store("n", n.accumulate(g + b2 * diff, b3, means=means))
        row_part, col_part = n.factors()
        n_hat = row_part * col_part / (1 - b3**t)  # unfactored: n / (1 - b3**t)
        numerator = m / (1 - b1**t) + b2 * v / (1 - b2**t)
        direction = numerator / (jnp.sqrt(n_hat + eps_root) + eps)
        if zero_eps:  # a zero numerator over a zero second moment: a zero step, not 0 / 0
            direction = jnp.where(numerator == 0, numerator, direction)
        leaf.store("prev_grad", leaf.g, after=("v", "n"))  # v and n read the old one
        return direction

    return _leafwise.transform(
        "scale_by_nesterov_moment",
        ScaleByNesterovMomentState,
        FIELDS,
        lambda step: step.map(leaf_math),
        options,
        factoring=layout if factored else None,  # unfactored: a full n, a tree like the params
    )
