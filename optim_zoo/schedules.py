"""The learning-rate schedules the optimizers use: Adafactor's relative step, Apollo's warmup."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks


def relative_step_size(*, multiply_by_parameter_scale: bool = True) -> optax.Schedule:
    r"""Adafactor's default step size, :math:`\min(10^{-2}, 1/\sqrt{t})` with :math:`t = c + 1`.

    tensor2tensor multiplies it by 0.05 when the update is not scaled by the parameter's RMS.

    Args:
      multiply_by_parameter_scale: whether the step is later multiplied by the parameter RMS.

    Returns:
      A schedule of the step count :math:`c` (0 on the first step).
    """
    _checks.check_flag("multiply_by_parameter_scale", multiply_by_parameter_scale)
    scale = 1.0 if multiply_by_parameter_scale else 0.05

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(count) + 1
        return scale * jnp.minimum(1e-2, jax.lax.rsqrt(t.astype(jnp.result_type(float))))

    return schedule


def linear_warmup(
    learning_rate: optax.ScalarOrSchedule,
    init_lr: jax.typing.ArrayLike | None = None,
    warmup: int = 500,
) -> optax.Schedule:
    r"""Apollo's learning-rate warmup: linear from ``init_lr`` to ``learning_rate``.

    .. math::

      \eta_c = (\eta(c) - \eta_0)\, c / \text{warmup} + \eta_0 \text{ for } c < \text{warmup},
      \quad \eta(c) \text{ afterwards},

    evaluated at the step count :math:`c` before the update (so the first step uses exactly
    :math:`\eta_0`), as the official code does for a constant rate. For a schedule
    :math:`\eta(c)`, the ramp aims at the schedule's current value. The official code instead
    ramps toward the rate it was constructed with and ignores its scheduler until the warmup
    ends; to reproduce that, warm up inside the schedule and pass ``warmup=0``::

      lambda c: jnp.where(c < w, init_lr + (lr - init_lr) * c / w, schedule(c))

    ``warmup=0`` means no warmup.

    Args:
      learning_rate: the target learning rate, a float or a schedule.
      init_lr: the first step's learning rate, in [0, learning_rate]; None means
        ``learning_rate / 1000`` (for a schedule, its value at step 0 divided by 1000).
      warmup: number of warmup steps, >= 0.

    Returns:
      A schedule of the step count.
    """
    _checks.check_learning_rate(learning_rate)
    _checks.check_interval("warmup", warmup, 0)
    if init_lr is not None:
        high = learning_rate if _checks.is_concrete_number(learning_rate) else None
        _checks.check_interval("init_lr", init_lr, 0.0, high, high_open=False)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        target = learning_rate(count) if callable(learning_rate) else learning_rate
        if init_lr is not None:
            start = init_lr
        else:
            start = (learning_rate(0) if callable(learning_rate) else learning_rate) / 1000
        count = jnp.asarray(count)
        ramp = (target - start) * count / jnp.maximum(warmup, 1) + start
        return jnp.where(count < warmup, ramp, target)

    return schedule
