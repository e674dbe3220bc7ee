"""Adai's adaptive per-element inertia (Xie et al. 2022), as the official code computes it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _dtypes, _fusion, _leafwise, _shards, _tree, second_moment
from optim_zoo._leafwise import MOMENTUM, PRODUCT, SECOND_MOMENT, Field
from optim_zoo.second_moment import FactoredSecondMoment, FactoringRule, LeafMoment


class ScaleByAdaptiveInertiaState(NamedTuple):
    """State of :func:`scale_by_adaptive_inertia`."""

    count: jax.Array  # shape (), int32: updates taken so far.
    m: optax.Updates  # momentum with per-element inertia; dtype_momentum (default: param dtype).
    # EMA of g**2, like the params, or a FactoredSecondMoment when factored;
    # dtype_second_moment (default: at least float32).
    v: optax.Updates | FactoredSecondMoment
    # Product of past per-element beta1, starts at one; at least float32 whatever the options:
    # a product near 1 must resolve 1 - eps (bfloat16 rounds 0.999 to 1).
    beta1_prod: optax.Updates


# In the order the update stores them: v in the first pass, m and beta1_prod in the second.
FIELDS = (Field("v", SECOND_MOMENT), Field("m", MOMENTUM), Field("beta1_prod", PRODUCT))


def scale_by_adaptive_inertia(
    beta0: jax.typing.ArrayLike = 0.1,
    beta2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    dampening: jax.typing.ArrayLike = 1.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    factored: bool = False,
    min_dim_size_to_factor: int = 128,
    factoring: FactoringRule = "largest_two",
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
    axis_name: str | tuple[str, ...] | None = None,
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
    official AdaiV2, and with :math:`g_t` replaced by :math:`g_t + \lambda p_t` first for L2
    decay (``weight_decay``; in the gradient's dtype, what :func:`optax.add_decayed_weights`
    chained before this transform gives, bit for bit; done here, each factored statistic
    computes it in its own loop instead of reading it from a temporary as large as the leaf).
    The first update is exactly the gradient. There is no epsilon in a
    denominator: Adai is SGD with adaptive momentum, so its learning rate is on SGD's scale.
    Where every gradient seen so far is zero (:math:`\bar v_t = 0`), :math:`\hat v / \bar v` is
    taken as 0 instead of the official code's NaN. No learning rate and no sign flip are applied.

    The mean :math:`\bar v_t` couples all leaves the transform sees. Under :func:`optax.masked` or
    :func:`optax.multi_transform` it covers only the leaves routed to this transform.

    With ``factored=True`` (new here, not from the Adai paper or code), :math:`v` is kept as
    Adafactor keeps its second moment (:mod:`optim_zoo.second_moment`): for a leaf factored over
    axes :math:`(a, b)` (:func:`optim_zoo.factored_dims`), EMAs :math:`R, C` (decay
    :math:`\beta_2`) of the mean of :math:`g^2` over :math:`b` and over :math:`a`, and
    :math:`v_t = (R_t / \mathrm{mean}_a(R_t)) \otimes C_t` wherever :math:`v` is read, the
    global mean included (summed without forming :math:`v`). Adai uses :math:`v` only through
    :math:`\hat v_t / \bar v_t`, so only the relative sizes of the entries matter. An n x m
    matrix then stores two full states plus n + m floats, not three.

    The update runs in two passes over the leaves: the second moments and their global mean
    :math:`\bar v_t`, then each leaf's inertia and momentum.

    Sharded parameters: under ``jax.jit`` with sharded arrays the mean is over the whole
    arrays, and XLA all-reduces each leaf's sum over the mesh axes that leaf is split over (one
    all-reduce per distinct set of axes). Inside :func:`jax.shard_map` the transform sees only
    each device's shards: ``axis_name`` names the mesh axes to average across, and the mean is
    then one scalar ``psum`` over them, each leaf's local sum divided by the number of devices
    along those axes holding the same shard (read from shard_map's types, so its
    ``check_vma`` must stay on). Without ``axis_name``, leaves split over shard_map axes raise
    an error rather than give a per-device mean silently; ``axis_name=()`` asks for exactly that.
    With ``factored=True`` there is no ``axis_name``: a factored leaf split over shard_map axes
    raises, as in :func:`optim_zoo.scale_by_factored_rms`.

    Args:
      beta0: the inertia scale, >= 0 (no upper bound, as in the official code).
      beta2: decay of the squared-gradient EMA, in [0, 1).
      eps: keeps :math:`\beta_1 \le 1 - \epsilon`; >= 0.
      dampening: AdaiV2's dampening :math:`d`; 1 gives Adai.
      weight_decay: L2 decay rate :math:`\lambda`, >= 0 (decoupled decay belongs after this
        transform: :func:`optax.add_decayed_weights`, as :func:`optim_zoo.adaiw` chains it).
      weight_decay_mask: a tree of booleans like the params (or a callable returning one):
        True where decay applies. None means everywhere.
      factored: keep ``v`` factored where a leaf allows.
      min_dim_size_to_factor: with ``factored`` and the default rule, factor a leaf only when
        the smaller of its two largest axes has at least this many elements.
      factoring: with ``factored``, which axes to factor: ``"largest_two"`` (default),
        ``"last_two"`` or a callable ``(path, shape) -> (a, b) | None``
        (:mod:`optim_zoo.second_moment`).
      dtype_momentum: dtype ``m`` is stored in; None means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype ``v`` is stored in; None means float32, or the parameter's
        dtype when it is wider. The arithmetic, and ``beta1_prod``, stay in at least float32.
        ``jnp.uint8``: 8-bit codes with a scale per block (see :func:`optim_zoo.adan`).
      state_rounding: how state stored narrower than the arithmetic is rounded:
        ``"nearest"`` (default) or ``"stochastic"`` (unbiased; see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the seed of the rounding, an integer in
        [0, 2**32); the bits also depend on the step count, so a resumed run continues exactly.
      axis_name: inside :func:`jax.shard_map`, the mesh axis name or names the global mean is
        taken across (one ``psum``); None (default) outside shard_map. Not with ``factored``,
        whose statistics average along axes a shard may split.

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
      writes a mean without fixing its scope), except at the edges of :math:`\bar v_t`: an
      all-zero gradient history gives a zero inertia ratio instead of NaN, and an infinite
      :math:`\bar v_t` (an infinite gradient anywhere) gives NaN everywhere, where the official
      code silently gives every other element the largest inertia for the rest of the run. A
      NaN gradient likewise makes every update NaN. A complex leaf is trained as its real and
      imaginary parts (PyTorch's convention), each counted in the mean. optax has no Adai.
    """
    _checks.check_interval("beta0", beta0, 0.0)
    _checks.check_interval("beta2", beta2, 0.0, 1.0)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("dampening", dampening, 0.0, 1.0, high_open=False)
    _checks.check_interval("weight_decay", weight_decay, 0.0)
    _checks.check_not_scheduled("weight_decay_mask", weight_decay_mask)
    layout = second_moment.checked_factoring(factored, min_dim_size_to_factor, factoring)
    options = _leafwise.storage(
        dtype_momentum, dtype_second_moment, state_rounding, state_rounding_seed
    )
    axis_names = _checks.check_axis_names(axis_name)
    if factored and axis_name is not None:
        raise ValueError(
            "axis_name cannot be combined with factored=True: the factored statistics average "
            "along axes that shard_map may split."
        )
    name = "scale_by_adaptive_inertia"

    def decayed_gradient(leaf: _leafwise.Leaf) -> jax.Array:
        """L2 decay, in the gradient's dtype (as optax.add_decayed_weights)."""
        return leaf.g + weight_decay * leaf.p if leaf.decayed else leaf.g

    def second_moment_pass(leaf: _leafwise.Leaf) -> tuple[LeafMoment, jax.Array]:
        """Pass 1: the leaf's second moment, and the sum of its debiased estimate's entries."""
        v, g = leaf.old("v"), decayed_gradient(leaf).astype(leaf.dtype)
        # Factored, each mean squares on its own, and computes g + wd * p in its own loop.
        means = None
        if leaf.decayed:
            means = _fusion.decayed_for_means(leaf.g, leaf.p, weight_decay, leaf.dtype, v.axes)
        v = leaf.store("v", v.accumulate(g, beta2, means=means or _fusion.mean_squares(g, v.axes)))
        return v, leaf.new("v").for_reduction(leaf.dtype).total(lambda x: leaf.sum(x, "v"))

    def inertia_pass(leaf: _leafwise.Leaf, v: LeafMoment, v_bar: jax.Array) -> jax.Array:
        """Pass 2: each element's inertia beta1 from v_hat / v_bar, then the momentum."""
        row_part, col_part = v.factors()
        v_hat = row_part * col_part / (1 - beta2**leaf.t)
        # All-zero history: v_hat is zero too, so a zero ratio gives the largest inertia. A
        # NaN v_bar (a NaN gradient anywhere) stays NaN: it must not pass for zero.
        ratio = jnp.where(v_bar == 0, 0, v_hat / jnp.where(v_bar == 0, 1, v_bar))
        beta1 = jnp.clip(
            1 - beta0 * ratio.astype(leaf.dtype) ** (1 / (3 - 2 * dampening)), 0, 1 - eps
        )
        beta1_prod = leaf.old("beta1_prod") * beta1
        leaf.store("beta1_prod", beta1_prod)
        g = _fusion.own_copy(decayed_gradient(leaf).astype(leaf.dtype))  # g also feeds v_bar
        m = leaf.store("m", beta1 * leaf.old("m") + (1 - beta1) ** dampening * g)
        # 1 - prod is 0 only when eps = 0 and beta1 has been 1 since step 1: m is 0 there.
        bias_correction = 1 - beta1_prod
        return m / jnp.where(bias_correction == 0, 1, bias_correction) * beta0 ** (1 - dampening)

    def update(step: _leafwise.Step) -> list[jax.Array]:
        v, v_sums = _tree.unzip(step.map(second_moment_pass), 2)
        v_bar = global_mean(step, v_sums)
        return step.map(inertia_pass, v, [v_bar] * len(v))

    def global_mean(step: _leafwise.Step, v_sums: tuple[jax.Array, ...]) -> jax.Array:
        """The mean of the debiased estimate over every element of every leaf (and device)."""
        leaves = [leaf.g for leaf in step.leaves]
        mean_dtype = _dtypes.compute_dtype(*(leaf.dtype for leaf in step.leaves))
        if axis_names is None:
            _shards.check_whole_leaves(
                leaves,
                name,
                "the mean of v over them",
                "Pass axis_name with the axes to average across (or axis_name=() for a mean "
                "over each device's own shards).",
            )
            v_total = sum(v_sums, jnp.zeros([], mean_dtype))
            num_elements = sum(g.size for g in leaves)
        else:  # Inside shard_map: one psum over the named axes.
            v_total, num_elements = _shards.total_and_count(
                v_sums, leaves, axis_names, jnp.zeros([], mean_dtype), name
            )
        v_bar = v_total / (1 - beta2 ** step.count.astype(mean_dtype)) / max(num_elements, 1)
        # An infinite mean (an infinite gradient anywhere) would set every other ratio to 0,
        # the largest inertia, silently and for good: NaN instead, so that it shows.
        return jnp.where(jnp.isinf(v_bar), jnp.nan, v_bar)

    return _leafwise.transform(
        name,
        ScaleByAdaptiveInertiaState,
        FIELDS,
        update,
        options,
        factoring=layout if factored else None,  # unfactored: a full v, a tree like the params
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
    )
