"""Hyperparameter validation shared by every optim_zoo module; dtype rules are in _dtypes."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_zoo import _dtypes

# Optax 0.2.8 leaves an injected hyperparameter that is already a jax array of a definite dtype
# as it is; earlier releases cast every floating-point one to the parameters' dtype.
INJECT_HYPERPARAMS_KEEPS_DTYPES = tuple(
    int(part) for part in optax.__version__.split(".")[:3] if part.isdigit()
) >= (0, 2, 8)


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong kind: a string, a bool, a list or a callable for a number.

    It is a `TypeError`, as Python raises for a value of the wrong type, and also a `ValueError`,
    the error every other invalid hyperparameter raises, so either `except` clause catches it.
    """


def is_concrete_number(value: Any) -> bool:
    """True for Python and NumPy real scalars (bools excluded); False for jax arrays and tracers.

    Values passed by `optax.inject_hyperparams` are jax arrays (tracers under `jax.jit`), so they
    are deliberately left unchecked: checking them would force a host sync or fail under tracing.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_ | jax.Array)


def may_be_zero(value: Any) -> bool:
    """False only for a concrete number > 0; a traced value may be zero when the step runs."""
    return not (is_concrete_number(value) and float(value) > 0)


def is_literal_zero(value: Any) -> bool:
    """True when `value` is a concrete number equal to 0: the option it sets does nothing."""
    return is_concrete_number(value) and value == 0


def _as_number(name: str, value: Any) -> float | None:
    """`value` as a float to check; None for jax arrays and tracers, which pass unchecked.

    Raises `HyperparameterTypeError` for anything that is not a number: strings (as YAML
    configs produce), bools, callables, containers.
    """
    if isinstance(value, jax.Array):
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if is_concrete_number(value):
        return float(value)
    hint = ""
    if isinstance(value, str | bytes):
        hint = " (a string, e.g. from a config file: convert it with float() first)"
    elif callable(value):
        hint = " (only learning_rate takes a schedule)"
    raise HyperparameterTypeError(
        f"{name} must be a number, got {value!r} of type {type(value).__name__}{hint}."
    )


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
    """Raises `ValueError` naming `name` unless a concrete `value` is finite and in the interval.

    Strings, bools, callables and containers raise `HyperparameterTypeError` (a `TypeError` and
    a `ValueError`); NaN and infinities are never valid. Jax arrays and tracers pass unchecked.

    Args:
      name: argument name, as the user wrote it.
      value: the argument's value.
      low: lower bound, or None for no lower bound.
      high: upper bound, or None for no upper bound.
      low_open: exclude `low` itself.
      high_open: exclude `high` itself.
      allow_none: whether `None` is an accepted value.
    """
    if value is None:
        if allow_none:
            return
        raise HyperparameterTypeError(f"{name} must be a number, got None.")
    number = _as_number(name, value)
    if number is None:
        return
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high or not math.isfinite(number):
        left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        interval = f"{'None or ' if allow_none else ''}finite and in {left}, {right}"
        raise ValueError(f"{name} must be {interval}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    """Raises `ValueError` naming `name` when `value` is not one of `choices`."""
    if isinstance(value, bool) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {{{allowed}}}, got {value!r}.")


def check_axis_names(value: Any) -> tuple[str, ...] | None:
    """`axis_name` as a tuple of distinct mesh axis names (a single name allowed), or None."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise HyperparameterTypeError(
            f"axis_name must be a mesh axis name, a tuple of them or None, got {value!r}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"axis_name names an axis twice: {value!r}.")
    return tuple(names)


def check_flag(name: str, value: Any) -> None:
    """Raises `HyperparameterTypeError` naming `name` unless `value` is a bool (a mode switch)."""
    if not isinstance(value, bool | np.bool_):
        raise HyperparameterTypeError(
            f"{name} must be True or False, got {value!r} of type {type(value).__name__}."
        )


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
    """A learning rate is a finite number >= 0 or a schedule (callable); schedules pass."""
    if callable(value) and not isinstance(value, jax.Array):
        return
    check_interval(name, value, 0.0)


def _injected_number(name: str) -> Any:
    """The number `optax.inject_hyperparams` was given for `name`, when it is tracing our init.

    `inject_hyperparams` turns every number into an array inside its own ``init``, which is a
    tracer there under `jax.jit` or `jax.eval_shape` (optax issue #412). It keeps the numbers it
    was given in a local mapping of that ``init``, ``numeric_hps``, which this reads from the
    calling frames. None when no such frame holds a Python number for `name`.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "init_fn" and "optax" in code.co_filename:
            numbers_given = frame.f_locals.get("numeric_hps")
            if isinstance(numbers_given, dict) and is_concrete_number(numbers_given.get(name)):
                return numbers_given[name]
        frame = frame.f_back
    return None


def check_not_scheduled(name: str, value: Any) -> None:
    """Raises `ValueError` naming `name` when `value` is what `optax.inject_hyperparams` made of
    a callable it took for a schedule, such as a weight-decay mask or a factoring rule.

    `inject_hyperparams` takes every callable for a schedule: it calls it with the step count
    and passes on what that returns, a value that may look like a valid argument (a mask that
    decays nothing) while meaning nothing. Its ``init`` and ``update`` keep the callables it
    took in a local mapping, ``sched_hps``, and what it passes in another, ``hparams``, which
    this reads from the calling frames. A callable itself was not taken for a schedule.
    """
    if callable(value):
        return
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("init_fn", "update_fn") and "optax" in code.co_filename:
            scheduled, passed = frame.f_locals.get("sched_hps"), frame.f_locals.get("hparams")
            if (
                isinstance(scheduled, dict)
                and isinstance(passed, dict)
                and name in scheduled
                and name in passed
                and passed[name] is value
            ):
                raise ValueError(
                    f"{name} is a callable, which optax.inject_hyperparams takes for a schedule: "
                    "it would pass on the callable's value at the step count instead. Give "
                    f"static_args=({name!r},) to optax.inject_hyperparams."
                )
        frame = frame.f_back


def static_int(name: str, value: Any) -> int:
    """`value`, a shape-deciding hyperparameter, as a Python int; called by `init`.

    A concrete jax array (as `optax.inject_hyperparams` passes it to an eager `init`) is read
    back to Python. A tracer (an injected value in an `init` traced by `jax.jit` or
    `jax.eval_shape`) is replaced by the Python number `inject_hyperparams` was given, so that
    no ``static_args`` are needed; only where there is none (a traced array given by the user)
    does it raise, saying what to do instead. `update` never needs the value: it reads each
    leaf's layout from the state.
    """
    check_interval(name, value, 0)
    if isinstance(value, jax.core.Tracer):
        value = _injected_number(name)
        if value is None:
            raise ValueError(
                f"{name} decides the shapes of the optimizer state, so init cannot take it as a "
                "traced value: call init outside jax.jit, or give optax.inject_hyperparams "
                f"static_args=('{name}',)."
            )
    number = float(np.asarray(value))
    if number != int(number):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(number)


# The state dtypes that mean 8-bit codes (optim_zoo._codes): the argument that takes each, and
# why the other one is refused there.
CODE_DTYPES = {
    "dtype_momentum": (
        jnp.dtype(jnp.int8),
        "momenta take both signs: jnp.int8 stores them as signed 8-bit codes",
    ),
    "dtype_second_moment": (
        jnp.dtype(jnp.uint8),
        "second moments are never negative: jnp.uint8 stores them as unsigned 8-bit codes, "
        "every bit for the magnitude",
    ),
}


def check_dtype(name: str, value: Any) -> jnp.dtype | None:
    """None, or `value` as a floating-point dtype a step can compute with
    (:func:`_dtypes.computes_with`: not an 8-bit float), or, for the two storage arguments of
    :data:`CODE_DTYPES`, its 8-bit code dtype (int8 for ``dtype_momentum``, uint8 for
    ``dtype_second_moment``); raises `ValueError` naming `name` otherwise.

    A jax array stands for its dtype: `optax.inject_hyperparams` takes a callable such as
    `jnp.bfloat16` for a schedule and passes its value, `jnp.bfloat16(count)`, instead. Optax
    before 0.2.8 casts that value to the parameters' dtype, losing the dtype asked for, so there a
    floating-point array is refused with the two ways out.
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
    if name in CODE_DTYPES and dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        code, why = CODE_DTYPES[name]
        if dtype != code:
            raise ValueError(
                f"{name} must be None, a floating-point dtype or jnp.{code.name} (8-bit codes), "
                f"got {value!r}: {why}."
            )
    elif dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be None or a floating-point dtype, got {value!r}.")
    elif not _dtypes.computes_with(dtype):
        raise ValueError(
            f"{name} must be None or a floating-point dtype that JAX promotes with float32 (the "
            f"least a step computes in), got {value!r}: {dtype.name} has no implicit promotion "
            "in JAX. Store the state in bfloat16 for half of float32's bytes"
            + (
                f", or as 8-bit codes (jnp.{CODE_DTYPES[name][0].name}) for about a quarter."
                if name in CODE_DTYPES
                else "."
            )
        )
    if isinstance(value, jax.Array) and not INJECT_HYPERPARAMS_KEEPS_DTYPES:
        raise ValueError(
            f"{name} arrived as a {dtype.name} array, as optax.inject_hyperparams passes a dtype "
            f"it took for a schedule; optax {optax.__version__} casts that array to the "
            f"parameters' dtype, so the dtype asked for is lost. Give static_args=({name!r},) "
            "to optax.inject_hyperparams, pass a dtype instance such as jnp.dtype(jnp.bfloat16) "
            "(passed through untouched), or upgrade optax to 0.2.8 or later."
        )
    return dtype


def check_second_moment_dtype(value: Any) -> jnp.dtype | None:
    """None, or `value` as float32, bfloat16 or float64; raises `ValueError` otherwise."""
    dtype = check_dtype("dtype_second_moment", value)
    if dtype is not None and dtype not in (*_dtypes.SECOND_MOMENT_DTYPES, jnp.dtype(jnp.uint8)):
        raise ValueError(
            "dtype_second_moment must be None, float32, bfloat16, float64 or uint8, got "
            f"{value!r}: {dtype.name} cannot hold the squares of ordinary gradients "
            "(bfloat16 keeps float32's range in half the bytes; uint8 stores 8-bit codes)."
        )
    return dtype


def check_state_rounding(rounding: Any, seed: Any) -> None:
    """`state_rounding` is one of `_dtypes.STATE_ROUNDINGS`; `state_rounding_seed` an integer in
    [0, 2**32).

    A jax array (as `optax.inject_hyperparams` passes it, a tracer under `jax.jit`) must be of
    an integer dtype; its value is not checked. Any integer dtype gives the seed of its low 32
    bits, so a NumPy or jax uint32 seed of 2**31 or more works there too.
    """
    check_choice("state_rounding", rounding, _dtypes.STATE_ROUNDINGS)
    allowed = "state_rounding_seed must be an integer in [0, 2**32)"
    dtype = getattr(seed, "dtype", None)  # jax arrays (tracers too), NumPy scalars and arrays
    if isinstance(seed, float) or (dtype is not None and not jnp.issubdtype(dtype, jnp.integer)):
        if isinstance(seed, jax.Array):
            raise HyperparameterTypeError(
                f"{allowed}, got a {jnp.dtype(dtype).name} array (as optax.inject_hyperparams "
                "passes a float): give an int."
            )
        raise HyperparameterTypeError(f"{allowed}, got {seed!r}: give an int.")
    if isinstance(seed, str | bytes):
        raise HyperparameterTypeError(
            f"{allowed}, got {seed!r}: convert a string from a config file with int() first."
        )
    number = _as_number("state_rounding_seed", seed)  # bools, containers and the like raise
    if number is not None and not 0 <= number < 2**32:
        raise ValueError(f"{allowed}, got {seed!r}.")
