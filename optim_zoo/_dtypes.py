"""The dtypes state is stored in and updates are computed in, for every optim_zoo transform."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Second moments hold squares: float16 (largest 65504, smallest normal 6e-5) cannot hold the
# g**2 of ordinary gradients, and 8-bit floats even less; bfloat16 has float32's range.
SECOND_MOMENT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float64))


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


def compute_dtype(*dtypes: jax.typing.DTypeLike | None) -> jnp.dtype:
    """The dtype an update's math runs in: the widest of `dtypes` (None ignored), >= float32.

    Whatever the state is stored in, the arithmetic of a step is never done in bfloat16 or
    float16; float64 parameters or states keep it in float64.
    """
    given = [d for d in dtypes if d is not None]
    return functools.reduce(jnp.promote_types, given, jnp.dtype(jnp.float32))
