"""Hyperparameter validation and dtype rules shared by every optim_zoo module."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp


def _is_concrete_number(value: Any) -> bool:
    """True for Python and NumPy scalars; False for jax arrays, tracers and schedules.

    Values passed by `optax.inject_hyperparams` are jax arrays (tracers under `jax.jit`), so they
    are deliberately left unchecked: checking them would force a host sync or fail under tracing.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool | jax.Array)


def check_interval(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
    allow_none: bool = False,
) -> None:
    """Raises `ValueError` naming `name` when a concrete `value` lies outside the interval.

    Args:
      name: argument name, as the user wrote it.
      value: the argument's value; arrays, tracers and callables pass unchecked.
      low: lower bound, or None for no lower bound.
      high: upper bound, or None for no upper bound.
      low_open: exclude `low` itself.
      high_open: exclude `high` itself.
      allow_none: whether `None` is an accepted value.
    """
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number, got None.")
    if not _is_concrete_number(value):
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value catches NaN.
        left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        interval = f"{'None or ' if allow_none else ''}in {left}, {right}"
        raise ValueError(f"{name} must be {interval}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """Raises `ValueError` naming `name` when `value` is not one of `choices`."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {{{allowed}}}, got {value!r}.")


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
    """A learning rate is a number >= 0 or a schedule (callable); schedules pass unchecked."""
    if callable(value):
        return
    check_interval(name, value, 0.0)


def stats_dtype(
    dtype: jax.typing.DTypeLike, dtype_second_moment: jnp.dtype | None = None
) -> jnp.dtype:
    """The dtype second-moment statistics are kept in: `dtype_second_moment` when given.

    Otherwise at least float32: bfloat16 and float16 parameters get float32 statistics, and
    float64 parameters keep float64 so that float64 runs are exact.
    """
    if dtype_second_moment is not None:
        return jnp.dtype(dtype_second_moment)
    return jnp.promote_types(dtype, jnp.float32)


def momentum_dtype(
    dtype: jax.typing.DTypeLike, dtype_momentum: jnp.dtype | None = None
) -> jnp.dtype:
    """The dtype first-moment-like state is kept in: `dtype_momentum`, else the parameter's."""
    return jnp.dtype(dtype if dtype_momentum is None else dtype_momentum)


def check_dtype(name: str, value: Any) -> jnp.dtype | None:
    """None, or `value` as a floating-point dtype; raises `ValueError` naming `name` otherwise.

    A jax array stands for its dtype: `optax.inject_hyperparams` takes a callable such as
    `jnp.bfloat16` for a schedule and passes its value, `jnp.bfloat16(count)`, instead.
    """
    if value is None:
        return None
    if isinstance(value, jax.Array):
        dtype = value.dtype
    else:
        try:
            dtype = jnp.dtype(value)
        except TypeError:
            dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be None or a floating-point dtype, got {value!r}.")
    return dtype


def compute_dtype(*dtypes: jax.typing.DTypeLike | None) -> jnp.dtype:
    """The dtype an update's math runs in: the widest of `dtypes` (None ignored), >= float32.

    Whatever the state is stored in, the arithmetic of a step is never done in bfloat16 or
    float16; float64 parameters or states keep it in float64.
    """
    given = [d for d in dtypes if d is not None]
    return functools.reduce(jnp.promote_types, given, jnp.dtype(jnp.float32))
