"""The optimizers: each is an `optax.chain` of an optim_zoo primitive and building blocks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, blocks
from optim_zoo.adaptive_inertia import scale_by_adaptive_inertia
from optim_zoo.confidence import scale_by_confidence
from optim_zoo.diag_hessian import scale_by_rectified_diag_hessian
from optim_zoo.factored import scale_by_factored_rms
from optim_zoo.nesterov import scale_by_nesterov_moment
from optim_zoo.schedules import linear_warmup, relative_step_size
from optim_zoo.second_moment import FactoringRule


def adan(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.98,
    b2: jax.typing.ArrayLike = 0.92,
    b3: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    no_prox: bool = False,
    weight_decay_mask: Any = None,
    max_grad_norm: jax.typing.ArrayLike | None = None,
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adan, the adaptive Nesterov momentum algorithm, exactly as its official code.

    With :math:`u_t` from :func:`optim_zoo.scale_by_nesterov_moment`, the default (proximal)
    weight decay and the ``no_prox=True`` variant are

    .. math::

      p_{t+1} = \frac{p_t - \eta_t u_t}{1 + \eta_t \lambda}, \qquad
      p_{t+1} = p_t (1 - \eta_t \lambda) - \eta_t u_t .

    The first step is :math:`p_1 = p_0 - \eta\, g / (|g| + \epsilon)` (then the decay). With
    ``max_grad_norm``, every gradient is first scaled by
    :math:`\min(\mathrm{max\_grad\_norm} / (\lVert g \rVert + \epsilon), 1)` over all leaves,
    and the clipped gradient is the one remembered for the next difference, as in the official
    code.

    State stored narrower than the arithmetic (``dtype_momentum`` or ``dtype_second_moment``
    bfloat16, say; the arithmetic runs in at least float32) is rounded to nearest by default.
    With ``state_rounding="stochastic"`` each new state value :math:`x` is stored as one of its
    two neighbours :math:`x_- \le x \le x_+` in the storage dtype, :math:`x_+` with probability
    :math:`(x - x_-) / (x_+ - x_-)`, so that :math:`\mathbb E[\text{stored}] = x`: an EMA whose
    increments are smaller than half a bfloat16 ulp (a decay of 0.99 and more) still moves on
    average, where rounding to nearest would keep it where it is. The random bits are a hash of
    ``state_rounding_seed``, the step count (in the state), the leaf, the state field and the
    element, so a run is repeatable and resumes bit for bit from a checkpoint; no state is
    added. Every optimizer of the package takes the same two arguments. State as wide as the
    arithmetic is stored as is, with no random bits drawn, so float32 state is unaffected.
    ``optax.inject_hyperparams`` turns a Python int into an int32 array, so there a seed of
    2**31 or more goes in ``static_args`` or as ``np.uint32(seed)``; any integer array works.

    8-bit state: ``dtype_momentum=jnp.int8`` and ``dtype_second_moment=jnp.uint8`` (every
    optimizer of the package takes them) store each leaf's field as a
    :class:`optim_zoo.CodedState`: one 8-bit code per element, with the parameter's shape, and
    one scale per 64 consecutive elements of its last axis, the block's largest finite
    magnitude. The code is companded, :math:`x = s\,\mathrm{sign}(k) (k / Q)^2` with
    :math:`Q = 127` signed (momenta) or 254 unsigned (second moments), so each block's largest
    value is exact and smaller ones keep a resolution proportional to their square root. The
    arithmetic decodes them and runs in float32; rounding to the codes is to nearest, or
    stochastic (unbiased) with ``state_rounding="stochastic"``, from the same streams as
    above. A positive second moment is never stored as zero (below the first code it is
    stored as the first code, so the step there is smaller, never ``m / eps``); a NaN or an
    infinity decodes to NaN, and its neighbours keep their values. Leaves under 4096 elements,
    or with a last axis under 64, keep the default dtypes; factored statistics and Adai's
    product of inertias stay float32. Adan's state goes from 16 to about 4.5 bytes per
    float32 parameter (``docs/eight_bit_state.md`` has the measurements).

    Args:
      learning_rate: a float >= 0 or an optax schedule.
      b1: decay of the gradient EMA (official convention; paper's :math:`1 - \beta_1`).
      b2: decay of the gradient-difference EMA (paper's :math:`1 - \beta_2`).
      b3: decay of the squared Nesterov gradient EMA (paper's :math:`1 - \beta_3`).
      eps: added to the denominator.
      eps_root: added inside the square root.
      weight_decay: decay rate :math:`\lambda`, >= 0.
      no_prox: use decoupled decay instead of the proximal step.
      weight_decay_mask: a tree of booleans like the params, or a callable returning one; True
        where decay applies.
      max_grad_norm: if given, the official global-norm clip (> 0). As in the official code, an
        infinite gradient makes the norm infinite and scales every gradient of that step by 0
        (the infinite element itself becomes NaN, so the step is not finite).
      dtype_momentum: dtype ``m``, ``v`` and the previous gradient are stored in; None means
        the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the squared moment ``n`` is stored in; None means
        float32, or the parameter's dtype when it is wider. The arithmetic runs in at least
        float32 whatever the storage.
        ``jnp.uint8``: 8-bit codes with a scale per block (see :func:`optim_zoo.adan`).
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.adan(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(300):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Xie et al., `Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models
      <https://arxiv.org/abs/2208.06677>`_, 2022; official code: https://github.com/sail-sg/Adan

    Differences:
      ``optax.adan`` (0.2.8) is not the official algorithm: it multiplies the gradient
      difference inside the squared term by :math:`1 - b_2` instead of :math:`b_2`, and offers
      only decoupled decay, never the official default proximal step. From the paper: the betas
      follow the code's complemented convention, and decay is proximal as in the code.
      Stochastic rounding of the state is optim_zoo's own option (the official code keeps the
      state in the parameter's dtype, rounded to nearest; optax has no such option).
    """
    moment = scale_by_nesterov_moment(
        b1,
        b2,
        b3,
        eps,
        eps_root,
        dtype_momentum=dtype_momentum,
        dtype_second_moment=dtype_second_moment,
        state_rounding=state_rounding,
        state_rounding_seed=state_rounding_seed,
    )
    return _adan_chain(
        moment, learning_rate, eps, weight_decay, no_prox, weight_decay_mask, max_grad_norm
    )


def _adan_chain(
    moment: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    eps: jax.typing.ArrayLike,
    weight_decay: jax.typing.ArrayLike,
    no_prox: bool,
    weight_decay_mask: Any,
    max_grad_norm: jax.typing.ArrayLike | None,
) -> optax.GradientTransformationExtraArgs:
    """Adan's chain around a Nesterov moment estimate: clip, decay, learning rate."""
    _checks.check_flag("no_prox", no_prox)
    transforms = []
    if max_grad_norm is not None:
        _checks.check_interval("max_grad_norm", max_grad_norm, 0.0, low_open=True)
        transforms.append(blocks.clip_by_global_norm(max_grad_norm, eps))
    transforms.append(moment)
    transforms.append(blocks.add_decayed_weights(weight_decay, weight_decay_mask))
    if no_prox:
        # optax's learning-rate and decay blocks check nothing: checked here.
        _checks.check_learning_rate(learning_rate)
        _checks.check_interval("weight_decay", weight_decay, 0.0)
        transforms.append(optax.scale_by_learning_rate(learning_rate))
    else:
        transforms.append(
            blocks.scale_by_proximal_learning_rate(learning_rate, weight_decay, weight_decay_mask)
        )
    return optax.chain(*transforms)


def adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: jax.typing.ArrayLike = 0.8,
    decay_offset: jax.typing.ArrayLike = 0,
    *,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: jax.typing.ArrayLike | None = 1.0,
    momentum: jax.typing.ArrayLike | None = None,
    # A dtype instance, not the callable jnp.float32: inject_hyperparams takes callables for
    # schedules, but passes a dtype through untouched.
    dtype_momentum: jax.typing.DTypeLike = jnp.dtype(jnp.float32),
    weight_decay_rate: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
    factoring: FactoringRule = "largest_two",
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adafactor, with tensor2tensor's semantics and optax's signature.

    With :math:`x_t` from :func:`optim_zoo.scale_by_factored_rms`, and per-tensor RMS,

    .. math::

      x_t &\leftarrow x_t / \max(1, \mathrm{rms}(x_t) / \mathrm{clipping\_threshold}) \\
      s_t &= \eta_t\, x_t \cdot \max(10^{-3}, \mathrm{rms}(p_t))
        \quad \text{(parameter scale, if enabled)} \\
      s_t &\leftarrow \mu s_{t-1} + (1 - \mu) s_t \quad \text{(momentum, if given; no debias)} \\
      p_{t+1} &= p_t - s_t - \lambda p_t \quad (\mathrm{weight\_decay\_rate}\ \lambda
        \text{, if given})

    ``learning_rate=None`` means the paper's relative step size
    :math:`\eta_t = \min(10^{-2}, 1/\sqrt t)` (times 0.05 without parameter scale), not "no
    learning rate" as in optax. The first four arguments may be positional, in optax's order;
    the rest are keyword-only.

    Args:
      learning_rate: a float >= 0, an optax schedule, or None for the relative step size.
      min_dim_size_to_factor: with the default rule, factor a leaf only when the smaller of its
        two largest axes has at least this many elements; 0 factors every leaf of rank >= 2
        over its two largest axes (tensor2tensor factors the last two:
        ``factoring="last_two"``).
      decay_rate: second-moment decay exponent, > 0.
      decay_offset: step at which the decay schedule restarts, >= 0 (earlier steps count as
        the first).
      multiply_by_parameter_scale: scale the step by :math:`\max(10^{-3}, \mathrm{rms}(p))`.
      clipping_threshold: None or > 0: clip each update's RMS to this (values below 1 are
        accepted, as tensor2tensor and optax do).
      momentum: None or in [0, 1): EMA of the scaled step.
      dtype_momentum: dtype the momentum is stored in: float32 by default, as in optax; None
        means the parameter's, as tensor2tensor keeps it. Updates keep the gradient dtype.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`);
        the step is then the momentum as stored (decoded), as in the other optimizers, where
        optax's ``ema`` steps by its value before the cast.
      weight_decay_rate: None or >= 0: decay added to the step (not scaled by the learning rate).
      eps: added to the squared gradient.
      factored: whether to factor second moments at all.
      weight_decay_mask: a tree of booleans like the params, or a callable returning one.
      factoring: which axes to factor: ``"largest_two"`` (default, as optax), ``"last_two"``
        (as tensor2tensor) or a callable ``(path, shape) -> (a, b) | None``
        (:mod:`optim_zoo.second_moment`); :func:`optim_zoo.pytorch_last_two` factors what
        Hugging Face's PyTorch Adafactor factors, on Flax's kernel layouts.
      dtype_second_moment: dtype the factored (and unfactored) statistics are stored in; None
        means float32, or the parameter's dtype when it is wider. The arithmetic runs in at
        least float32 whatever the storage.
        ``jnp.uint8``: 8-bit codes for full statistics; factored ones, small, keep float32.
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.adafactor(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
      <https://arxiv.org/abs/1804.04235>`_, 2018; official code: tensorflow/tensor2tensor,
      ``tensor2tensor/utils/adafactor.py``.

    Differences:
      From optax's ``adafactor``: ``learning_rate=None`` is the relative step size (optax
      applies no learning rate), float64 statistics stay float64, unfactored leaves carry no
      placeholder state, and zero-size leaves are never factored. From tensor2tensor: by
      default the two largest axes are factored rather than the last two (the same for
      matrices, not for most 4-D convolution kernels; ``factoring="last_two"`` is
      tensor2tensor's rule), and the momentum is kept in float32 rather than in the
      parameter's dtype (``dtype_momentum=None`` is tensor2tensor's).
    """
    # optax's learning-rate, EMA and decay blocks check nothing: checked here.
    _checks.check_flag("multiply_by_parameter_scale", multiply_by_parameter_scale)
    _checks.check_interval(
        "clipping_threshold", clipping_threshold, 0.0, low_open=True, allow_none=True
    )
    _checks.check_interval("momentum", momentum, 0.0, 1.0, allow_none=True)
    _checks.check_interval("weight_decay_rate", weight_decay_rate, 0.0, allow_none=True)
    dtype_momentum = _checks.check_dtype("dtype_momentum", dtype_momentum)
    if learning_rate is None:
        learning_rate = relative_step_size(multiply_by_parameter_scale=multiply_by_parameter_scale)
    else:
        _checks.check_learning_rate(learning_rate)
    transforms = [
        scale_by_factored_rms(
            factored=factored,
            decay_rate=decay_rate,
            decay_offset=decay_offset,
            min_dim_size_to_factor=min_dim_size_to_factor,
            eps=eps,
            factoring=factoring,
            dtype_second_moment=dtype_second_moment,
            state_rounding=state_rounding,
            state_rounding_seed=state_rounding_seed,
        )
    ]
    if clipping_threshold is not None:
        transforms.append(blocks.clip_by_block_rms(clipping_threshold))
    transforms.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        transforms.append(blocks.scale_by_param_rms())
    if momentum is not None:
        transforms.append(
            blocks.momentum_of_steps(momentum, dtype_momentum, state_rounding, state_rounding_seed)
        )
    if weight_decay_rate is not None:
        transforms.append(blocks.add_decayed_weights(weight_decay_rate, weight_decay_mask))
    transforms.append(optax.scale(-1.0))
    return optax.chain(*transforms)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-4,
    *,
    rebound: str = "constant",
    warmup: int = 500,
    init_lr: jax.typing.ArrayLike | None = None,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_type: str | None = None,
    weight_decay_mask: Any = None,
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Apollo, the adaptive parameter-wise diagonal quasi-Newton method, as its official code.

    With :math:`d_t` from :func:`optim_zoo.scale_by_rectified_diag_hessian` (decoupled or stable
    decay included), :math:`p_{t+1} = p_t - \eta_c d_t`, where :math:`\eta_c` warms up linearly
    from ``init_lr`` to ``learning_rate`` over ``warmup`` steps, evaluated at the step count
    :math:`c` before the update (:func:`optim_zoo.linear_warmup`). L2 decay adds
    :math:`\lambda p_t` to the gradient first. The first step (constant rebound) is
    :math:`p_1 = p_0 - \eta_0 g / 0.01`, so a warmup of at least ~100 steps matters; the
    official README's starting point is ``learning_rate=0.01, eps=1e-4, init_lr=1e-5,
    warmup=500``.

    Args:
      learning_rate: the learning rate after warmup, a float >= 0 or an optax schedule.
      beta: decay of the gradient EMA, in [0, 1).
      eps: the official ``eps``, > 0 (at 0 the first step is 0 / 0 for every gradient).
      rebound: ``'constant'`` (default) or ``'belief'``.
      warmup: number of linear warmup steps, >= 0.
      init_lr: first learning rate, in [0, learning_rate]; None means ``learning_rate / 1000``.
      weight_decay: decay rate :math:`\lambda`, >= 0.
      weight_decay_type: ``'L2'``, ``'decoupled'`` or ``'stable'``; None means ``'L2'`` with
        the constant rebound and ``'decoupled'`` with the belief rebound (official defaults).
      weight_decay_mask: a tree of booleans like the params, or a callable returning one.
      dtype_momentum: dtype the gradient EMA ``m`` and the direction are stored in; None
        means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the Hessian estimate is stored in; None means
        float32, or the parameter's dtype when it is wider. The arithmetic runs in at least
        float32 whatever the storage.
        ``jnp.uint8``: 8-bit codes, signed as ``B`` takes both signs (:func:`optim_zoo.adan`).
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.apollo(learning_rate=0.01, warmup=10)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Ma, `Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for Nonconvex
      Stochastic Optimization <https://arxiv.org/abs/2009.13586>`_, 2020; official code:
      https://github.com/XuezheMax/apollo

    Differences:
      See :func:`optim_zoo.scale_by_rectified_diag_hessian`. optax has no Apollo.
    """
    _checks.check_choice(
        "weight_decay_type", weight_decay_type, (None, "L2", "decoupled", "stable")
    )
    if weight_decay_type is None:
        weight_decay_type = "L2" if rebound == "constant" else "decoupled"
    transforms = []
    if weight_decay_type == "L2":
        # L2 decay used to be add_decayed_weights in this place of the chain; the primitive
        # applies it now (faster, the same values), and the decay block's state stays here
        # (masked or not), so that checkpoints of earlier versions restore.
        transforms.append(
            blocks.state_only(blocks.add_decayed_weights(weight_decay, weight_decay_mask))
        )
    transforms.append(
        scale_by_rectified_diag_hessian(
            beta,
            eps,
            weight_decay,
            rebound=rebound,
            weight_decay_type=weight_decay_type,
            weight_decay_mask=weight_decay_mask,
            dtype_momentum=dtype_momentum,
            dtype_second_moment=dtype_second_moment,
            state_rounding=state_rounding,
            state_rounding_seed=state_rounding_seed,
        )
    )
    transforms.append(optax.scale_by_learning_rate(linear_warmup(learning_rate, init_lr, warmup)))
    return optax.chain(*transforms)


def adai(
    learning_rate: optax.ScalarOrSchedule,
    beta0: jax.typing.ArrayLike = 0.1,
    beta2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-3,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    decoupled: bool = False,
    weight_decay_mask: Any = None,
    dampening: jax.typing.ArrayLike = 1.0,
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adai, SGD with adaptive per-element inertia, exactly as its official code.

    With :math:`u_t` from :func:`optim_zoo.scale_by_adaptive_inertia`,

    .. math::

      p_{t+1} = p_t - \eta_t u_t \quad \text{(L2 decay: } g_t \leftarrow g_t + \lambda p_t
        \text{ first)}, \qquad
      p_{t+1} = p_t (1 - \eta_t \lambda) - \eta_t u_t \quad \text{(decoupled, AdaiW)} .

    The first step is plain SGD, :math:`p_1 = p_0 - \eta g`. The learning rate is on SGD's
    scale (the official README: SGD's learning rate, or 10x SGD-with-momentum's; e.g. 0.1 to 1
    for CNNs). The inertia depends on a mean over every element of every leaf this optimizer
    sees; under :func:`optax.masked` or :func:`optax.multi_transform` that is only the leaves
    routed to it.

    Args:
      learning_rate: a float >= 0 or an optax schedule.
      beta0: inertia scale, >= 0.
      beta2: decay of the squared-gradient EMA, in [0, 1).
      eps: keeps the per-element inertia at most :math:`1 - \epsilon`; >= 0.
      weight_decay: decay rate :math:`\lambda`, >= 0.
      decoupled: decoupled decay (AdaiW) instead of L2.
      weight_decay_mask: a tree of booleans like the params, or a callable returning one.
      dampening: the official AdaiV2 dampening, in [0, 1]; 1 is Adai.
      dtype_momentum: dtype the momentum ``m`` is stored in; None means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype ``v`` is stored in; None means float32, or the parameter's
        dtype when it is wider. The arithmetic, and the product of past inertias, stay in at
        least float32 whatever the storage.
        ``jnp.uint8``: 8-bit codes with a scale per block (see :func:`optim_zoo.adan`).
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).
      axis_name: only for an update computed inside :func:`jax.shard_map`: the mesh axis name
        or names to take the mean across, with one ``psum`` (see
        :func:`optim_zoo.scale_by_adaptive_inertia`).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.adai(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Xie et al., `Adaptive Inertia: Disentangling the Effects of Adaptive Learning Rate and
      Momentum <https://arxiv.org/abs/2006.15815>`_, ICML 2022; official code:
      https://github.com/zeke-xie/adaptive-inertia-adai

    Differences:
      See :func:`optim_zoo.scale_by_adaptive_inertia`. optax has no Adai.
    """
    return _adai_chain(
        learning_rate,
        weight_decay,
        decoupled,
        weight_decay_mask,
        beta0=beta0,
        beta2=beta2,
        eps=eps,
        dampening=dampening,
        dtype_momentum=dtype_momentum,
        dtype_second_moment=dtype_second_moment,
        state_rounding=state_rounding,
        state_rounding_seed=state_rounding_seed,
        axis_name=axis_name,
    )


def _adai_chain(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike,
    decoupled: bool,
    weight_decay_mask: Any,
    **inertia_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """Adai's chain: the adaptive-inertia momentum (`inertia_kwargs`) with L2 decay, or followed
    by decoupled decay; then the learning rate."""
    # optax's learning-rate and decay blocks check nothing: checked here.
    _checks.check_learning_rate(learning_rate)
    _checks.check_interval("weight_decay", weight_decay, 0.0)
    _checks.check_flag("decoupled", decoupled)
    decay = blocks.add_decayed_weights(weight_decay, weight_decay_mask)
    if decoupled:
        transforms = [scale_by_adaptive_inertia(**inertia_kwargs), decay]
    else:
        # L2 decay used to be `decay` in this place of the chain; the primitive applies it now
        # (the same values, without a temporary for the factored statistics), and `decay`'s
        # state stays here, so that checkpoints of earlier versions restore.
        transforms = [
            blocks.state_only(decay),
            scale_by_adaptive_inertia(
                **inertia_kwargs, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask
            ),
        ]
    return optax.chain(*transforms, optax.scale_by_learning_rate(learning_rate))


def adaiw(
    learning_rate: optax.ScalarOrSchedule,
    beta0: jax.typing.ArrayLike = 0.1,
    beta2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-3,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    weight_decay_mask: Any = None,
    dampening: jax.typing.ArrayLike = 1.0,
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaiW: Adai with decoupled weight decay.

    :math:`p_{t+1} = p_t (1 - \eta_t \lambda) - \eta_t u_t`.

    Identical to ``adai(..., decoupled=True)``; see :func:`optim_zoo.adai`.

    Example:
      >>> import optim_zoo
      >>> tx = optim_zoo.adaiw(learning_rate=0.1, weight_decay=5e-4)
    """
    return adai(
        learning_rate,
        beta0,
        beta2,
        eps,
        weight_decay,
        decoupled=True,
        weight_decay_mask=weight_decay_mask,
        dampening=dampening,
        dtype_momentum=dtype_momentum,
        dtype_second_moment=dtype_second_moment,
        state_rounding=state_rounding,
        state_rounding_seed=state_rounding_seed,
        axis_name=axis_name,
    )


def came(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: jax.typing.ArrayLike = 0.9999,
    eps: jax.typing.ArrayLike = 1e-30,
    eps_confidence: jax.typing.ArrayLike = 1e-16,
    clipping_threshold: jax.typing.ArrayLike | None = 1.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    weight_decay_mask: Any = None,
    factoring: FactoringRule = "last_two",
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""CAME, confidence-guided adaptive memory-efficient optimization, as its official code.

    With :math:`x_t` from :func:`optim_zoo.scale_by_factored_rms` at the constant decay
    :math:`b_2` (factored over the last two axes of every leaf of rank >= 2), clipped per tensor
    to RMS ``clipping_threshold``, and :math:`s_t` from :func:`optim_zoo.scale_by_confidence`
    (decays :math:`b_1`, :math:`b_3`),

    .. math::

      p_{t+1} = p_t - \eta_t (s_t + \lambda p_t) .

    No bias correction anywhere, as in the official code. State per matrix: one full momentum
    and four vectors; per vector: the momentum and a full second moment.

    Args:
      learning_rate: a float >= 0 or an optax schedule.
      b1: decay of the momentum, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the instability, in [0, 1).
      eps: added to the squared gradient; >= 0.
      eps_confidence: added to the instability; >= 0.
      clipping_threshold: None or > 0: clip each update's RMS to this.
      weight_decay: decoupled decay rate :math:`\lambda`, >= 0.
      weight_decay_mask: a tree of booleans like the params, or a callable returning one.
      factoring: which axes to factor: ``"last_two"`` (the default, the official code's),
        ``"largest_two"`` or a callable ``(path, shape) -> (a, b) | None``
        (:mod:`optim_zoo.second_moment`), for both factored statistics. The official code's
        last two axes are PyTorch's layout's; on Flax's convolution kernels (HWIO),
        :func:`optim_zoo.pytorch_last_two` factors the axes it factors.
      dtype_momentum: dtype the momentum is stored in; None means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the factored statistics are stored in; None means float32, or
        the parameter's dtype when it is wider. The arithmetic runs in at least float32.
        ``jnp.uint8``: 8-bit codes for full statistics; factored ones, small, keep float32.
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.came(learning_rate=0.05)
      >>> params = jnp.array([[1.0, -2.0], [0.5, 3.0]])
      >>> state = tx.init(params)
      >>> for _ in range(300):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Luo et al., `CAME: Confidence-guided Adaptive Memory Efficient Optimization
      <https://arxiv.org/abs/2307.02047>`_, ACL 2023; official code:
      https://github.com/yangluo7/CAME (``came_pytorch/CAME.py``).

    Differences:
      See :func:`optim_zoo.scale_by_confidence`. The decay is applied as one step with the
      update, :math:`-\eta (s + \lambda p)`, where the official code first scales
      :math:`p` by :math:`1 - \eta \lambda`: equal up to rounding. optax has no CAME.
    """
    _checks.check_interval("b2", b2, 0.0, 1.0)
    _checks.check_interval(
        "clipping_threshold", clipping_threshold, 0.0, low_open=True, allow_none=True
    )
    # optax's learning-rate and decay blocks check nothing: checked here.
    _checks.check_learning_rate(learning_rate)
    _checks.check_interval("weight_decay", weight_decay, 0.0)
    transforms = [
        scale_by_factored_rms(
            decay=b2,
            min_dim_size_to_factor=0,
            eps=eps,
            factoring=factoring,
            dtype_second_moment=dtype_second_moment,
            state_rounding=state_rounding,
            state_rounding_seed=state_rounding_seed,
        )
    ]
    if clipping_threshold is not None:
        transforms.append(blocks.clip_by_block_rms(clipping_threshold))
    transforms.append(
        scale_by_confidence(
            b1,
            b3,
            eps_confidence,
            factoring=factoring,
            dtype_momentum=dtype_momentum,
            dtype_second_moment=dtype_second_moment,
            state_rounding=state_rounding,
            state_rounding_seed=state_rounding_seed,
        )
    )
    transforms.append(blocks.add_decayed_weights(weight_decay, weight_decay_mask))
    transforms.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*transforms)


# --- New combinations: not from any paper or official code --------------------------------------


def factored_adan(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.98,
    b2: jax.typing.ArrayLike = 0.92,
    b3: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    no_prox: bool = False,
    weight_decay_mask: Any = None,
    max_grad_norm: jax.typing.ArrayLike | None = None,
    min_dim_size_to_factor: int = 128,
    factoring: FactoringRule = "largest_two",
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adan with Adafactor's factored second moment. New here: not from a paper.

    This combination is optim_zoo's own; neither the Adan nor the Adafactor authors proposed
    or tested it. It is :func:`optim_zoo.adan` in every respect (betas, proximal or decoupled
    decay, clipping) except that the squared Nesterov moment :math:`n` of each matrix is kept
    as Adafactor keeps its second moment: an EMA (decay ``b3``) of its mean over each of the
    two largest axes, :math:`R` and :math:`C`, rebuilt as
    :math:`n = (R / \mathrm{mean}(R)) \otimes C` in the update
    (:func:`optim_zoo.scale_by_nesterov_moment` with ``factored=True``). Leaves with fewer than
    two axes, or whose second-largest axis is below ``min_dim_size_to_factor``, keep the full
    :math:`n`, so on such a model it is exactly Adan.

    State per n x m matrix: three full arrays (``m``, ``v``, the previous gradient) and n + m
    floats, against Adan's four full arrays.

    Args:
      learning_rate: a float >= 0 or an optax schedule.
      b1: decay of the gradient EMA (official Adan convention).
      b2: decay of the gradient-difference EMA.
      b3: decay of the factored squared Nesterov gradient EMAs.
      eps: added to the denominator.
      eps_root: added inside the square root.
      weight_decay: decay rate :math:`\lambda`, >= 0.
      no_prox: use decoupled decay instead of the proximal step.
      weight_decay_mask: a tree of booleans like the params, or a callable returning one.
      max_grad_norm: if given, Adan's global-norm clip (> 0).
      min_dim_size_to_factor: with the default rule, factor a leaf only when the smaller of its
        two largest axes has at least this many elements; 0 factors every leaf of rank >= 2.
      factoring: which axes to factor: ``"largest_two"`` (default), ``"last_two"`` or a
        callable ``(path, shape) -> (a, b) | None`` (:mod:`optim_zoo.second_moment`).
      dtype_momentum: dtype ``m``, ``v`` and the previous gradient are stored in; None means
        the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the factored statistics are stored in; None means float32, or
        the parameter's dtype when it is wider.
        ``jnp.uint8``: 8-bit codes for full statistics; factored ones, small, keep float32.
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.factored_adan(learning_rate=0.1, min_dim_size_to_factor=2)
      >>> params = jnp.array([[1.0, -2.0], [0.5, 3.0]])
      >>> state = tx.init(params)
      >>> [x.shape for x in state[0].n.v_row + state[0].n.v_col]  # 2 + 2 floats, not 4
      [(2,), (2,)]
      >>> for _ in range(300):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Adan: Xie et al., https://arxiv.org/abs/2208.06677. Factored second moment: Shazeer and
      Stern, https://arxiv.org/abs/1804.04235.
    """
    moment = scale_by_nesterov_moment(
        b1,
        b2,
        b3,
        eps,
        eps_root,
        factored=True,
        min_dim_size_to_factor=min_dim_size_to_factor,
        factoring=factoring,
        dtype_momentum=dtype_momentum,
        dtype_second_moment=dtype_second_moment,
        state_rounding=state_rounding,
        state_rounding_seed=state_rounding_seed,
    )
    return _adan_chain(
        moment, learning_rate, eps, weight_decay, no_prox, weight_decay_mask, max_grad_norm
    )


def factored_adai(
    learning_rate: optax.ScalarOrSchedule,
    beta0: jax.typing.ArrayLike = 0.1,
    beta2: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-3,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    decoupled: bool = False,
    weight_decay_mask: Any = None,
    dampening: jax.typing.ArrayLike = 1.0,
    min_dim_size_to_factor: int = 128,
    factoring: FactoringRule = "largest_two",
    dtype_momentum: jax.typing.DTypeLike | None = None,
    dtype_second_moment: jax.typing.DTypeLike | None = None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adai (or AdaiW) with Adafactor's factored second moment. New here: not from a paper.

    This combination is optim_zoo's own; neither the Adai nor the Adafactor authors proposed
    or tested it. Adai reads its second moment :math:`v` only through the ratio
    :math:`\hat v_t / \bar v_t`, which sets each element's inertia, so a factored estimate can
    stand in for it: each matrix keeps EMAs (decay ``beta2``) of the mean of :math:`g^2` over
    its two largest axes, :math:`R` and :math:`C`, and :math:`v = (R / \mathrm{mean}(R))
    \otimes C` wherever Adai reads it, the global mean :math:`\bar v_t` included
    (:func:`optim_zoo.scale_by_adaptive_inertia` with ``factored=True``). Everything else is
    :func:`optim_zoo.adai`: the first step is plain SGD, L2 or decoupled (``decoupled=True``,
    AdaiW) decay, AdaiV2 dampening. Leaves that are not factored keep the full :math:`v`.

    State per n x m matrix: two full arrays (``m`` and the product of past inertias) and
    n + m floats, against Adai's three full arrays.

    Args:
      learning_rate: a float >= 0 or an optax schedule (on SGD's scale, as Adai's).
      beta0: inertia scale, >= 0.
      beta2: decay of the factored squared-gradient EMAs, in [0, 1).
      eps: keeps the per-element inertia at most :math:`1 - \epsilon`; >= 0.
      weight_decay: decay rate :math:`\lambda`, >= 0.
      decoupled: decoupled decay (AdaiW) instead of L2.
      weight_decay_mask: a tree of booleans like the params, or a callable returning one.
      dampening: AdaiV2's dampening, in [0, 1]; 1 is Adai.
      min_dim_size_to_factor: with the default rule, factor a leaf only when the smaller of its
        two largest axes has at least this many elements; 0 factors every leaf of rank >= 2.
      factoring: which axes to factor: ``"largest_two"`` (default), ``"last_two"`` or a
        callable ``(path, shape) -> (a, b) | None`` (:mod:`optim_zoo.second_moment`).
      dtype_momentum: dtype ``m`` is stored in; None means the parameter's.
        ``jnp.int8``: 8-bit signed codes with a scale per block (see :func:`optim_zoo.adan`).
      dtype_second_moment: dtype the factored statistics are stored in; None means float32, or
        the parameter's dtype when it is wider.
        ``jnp.uint8``: 8-bit codes for full statistics; factored ones, small, keep float32.
      state_rounding: how state stored narrower than the arithmetic (bfloat16 state, say) is
        rounded: ``"nearest"`` (default) or ``"stochastic"`` (see :func:`optim_zoo.adan`).
      state_rounding_seed: with ``"stochastic"``, the rounding's seed, an integer in [0, 2**32).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optim_zoo
      >>> f = lambda p: jnp.sum(p**2)
      >>> tx = optim_zoo.factored_adai(learning_rate=0.1, min_dim_size_to_factor=2)
      >>> params = jnp.array([[1.0, -2.0], [0.5, 3.0]])
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     updates, state = tx.update(jax.grad(f)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f(params) < 1e-2)
      True

    References:
      Adai: Xie et al., https://arxiv.org/abs/2006.15815. Factored second moment: Shazeer and
      Stern, https://arxiv.org/abs/1804.04235.
    """
    return _adai_chain(
        learning_rate,
        weight_decay,
        decoupled,
        weight_decay_mask,
        beta0=beta0,
        beta2=beta2,
        eps=eps,
        dampening=dampening,
        factored=True,
        min_dim_size_to_factor=min_dim_size_to_factor,
        factoring=factoring,
        dtype_momentum=dtype_momentum,
        dtype_second_moment=dtype_second_moment,
        state_rounding=state_rounding,
        state_rounding_seed=state_rounding_seed,
    )
