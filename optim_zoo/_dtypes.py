"""The dtypes state is stored in and updates are computed in, for every optim_zoo transform."""

from __future__ import annotations

import functools
import zlib
from typing import Any

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


def computes_with(dtype: jax.typing.DTypeLike) -> bool:
    """True when a step's arithmetic (:func:`compute_dtype`) can take `dtype` in: JAX promotes
    no 8-, 6- or 4-bit float with float32 (they are cast explicitly or not at all)."""
    try:
        jnp.promote_types(dtype, jnp.float32)
    except jax.dtypes.TypePromotionError:
        return False
    return True


# --- Storing state: rounded to nearest, or stochastically ---------------------------------------

STATE_ROUNDINGS = ("nearest", "stochastic")

# Each transform's random rounding bits are told apart from those of the others chained with it
# by a number of its own. Fixed: a checkpointed run resumes with the bits it started with.
_SALTS = {
    "scale_by_nesterov_moment": 1,
    "scale_by_factored_rms": 2,
    "scale_by_rectified_diag_hessian": 3,
    "scale_by_adaptive_inertia": 4,
    "scale_by_confidence": 5,
    "adafactor_momentum": 6,
}


def salt(transform: str) -> int:
    """The number that gives `transform`'s rounding streams their own bits."""
    return _SALTS[transform]


def is_narrower(dtype: jax.typing.DTypeLike, than: jax.typing.DTypeLike) -> bool:
    """True when `dtype` cannot hold every value of `than` (bfloat16 than float32, say)."""
    return jnp.promote_types(dtype, than) != jnp.dtype(dtype)


def _mix(x: jax.Array) -> jax.Array:
    """A bijection of uint32 whose every output bit depends on every input bit (Wellons'
    ``lowbias32``): a counter-based generator in a few integer operations per element."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _element_bits(stream: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """32 uniform random bits per element of `shape`, from a uint32 scalar `stream`.

    The bits hash each element's flat index with the stream. Computed from iotas, they fuse into
    the loop that stores the state (no random array is written out), and a sharded leaf gets the
    same bits as an unsharded one.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride = (stride * shape[axis]) % 2**32
    return _mix(index * jnp.uint32(0x9E3779B9) + stream)


def _stochastic_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """float32 `x` in bfloat16, rounded up (in magnitude) with the probability of the discarded
    fraction: 16 random bits added to the 16 that bfloat16 drops, then truncated.

    bfloat16 has float32's exponent, so the carry rounds across binades and, for values above
    bfloat16's largest, to infinity, as the bit patterns order the values. Infinities and NaN
    get no random bits; a NaN keeps its quiet bit set, so that truncation leaves it a NaN. All in
    integers on one input, so it stays one loop with the arithmetic that computes `x`.
    """
    pattern = jax.lax.bitcast_convert_type(x, jnp.uint32)
    special = (pattern & jnp.uint32(0x7F800000)) == jnp.uint32(0x7F800000)
    nan_bit = jnp.where(pattern & jnp.uint32(0x007FFFFF), jnp.uint32(0x00400000), jnp.uint32(0))
    rounded = jnp.where(special, pattern | nan_bit, pattern + (bits >> 16))
    truncated = jax.lax.bitcast_convert_type(rounded & jnp.uint32(0xFFFF0000), jnp.float32)
    return truncated.astype(jnp.bfloat16)  # exact: the low 16 bits are zero


def _stochastic(x: jax.Array, dtype: jnp.dtype, bits: jax.Array) -> jax.Array:
    """`x` in the narrower `dtype`: one of its two neighbours there, the farther one with the
    probability of its share of the gap, so the expected value is `x` (any pair of dtypes).

    Values that `dtype` holds exactly, infinities and NaN are rounded to nearest, and so are
    values beyond the largest finite number of `dtype` (rounding up would give infinity).
    """
    near = x.astype(dtype)
    near_wide = near.astype(x.dtype)
    away = jnp.where(near_wide < x, jnp.inf, -jnp.inf).astype(dtype)
    other = jnp.nextafter(near, away)
    other_wide = other.astype(x.dtype)
    probability = (x - near_wide) / (other_wide - near_wide)  # in [0, 1/2]
    uniform = (bits >> 8).astype(x.dtype) * 2.0**-24  # [0, 1) in 24 exact bits
    inside = jnp.isfinite(near_wide) & jnp.isfinite(other_wide) & (near_wide != x)
    return jnp.where(inside & (uniform < probability), other, near)


class StateRounding:
    """How a transform stores state narrower than its arithmetic, at one update.

    ``"nearest"``: ``x.astype(dtype)``. ``"stochastic"``: rounded up or down at random, up with
    the probability of the discarded fraction, so that the stored value is `x` on average and
    small increments to a state (an EMA with a decay near 1) are not lost to rounding. The random
    bits are a function of the seed, the step count, the transform (`salt`), the leaf's path, the
    state field and the element alone: a run is repeatable, and resumes bit for bit from a
    checkpointed state, which holds the count. State as wide as the arithmetic is stored as is
    under either rounding, and then no random bit is drawn.
    """

    def __init__(self, rounding: str, seed: Any, count: jax.Array, salt: int):
        self.stochastic = rounding == "stochastic"
        self._seed, self._count, self._salt = seed, count, salt
        self._step_bits = None

    def step_bits(self) -> jax.Array:
        """One uint32 scalar per update from the seed and the count, drawn once if at all."""
        if self._step_bits is None:
            key = jax.random.fold_in(jax.random.key(self._seed, impl="threefry2x32"), self._count)
            self._step_bits = jax.random.bits(key, (), jnp.uint32)
        return self._step_bits

    def for_leaf(self, path: str) -> LeafRounding:
        """The rounding of the state of the leaf at `path` (``jax.tree_util.keystr``).

        Leaves draw independent bits, a function of their path: adding or removing other
        leaves does not change them.
        """
        return LeafRounding(self, (self._salt * 0x10001 + zlib.crc32(path.encode())) % 2**32)


class LeafRounding:
    """:class:`StateRounding` for the state of one leaf."""

    def __init__(self, step: StateRounding, tag: int):
        self._step, self._tag = step, tag

    def store(self, x: jax.Array, dtype: jax.typing.DTypeLike, field: int) -> jax.Array:
        """`x` in `dtype`; `field` tells the state arrays of one leaf apart (0, 1, ...)."""
        dtype = jnp.dtype(dtype)
        if not self._step.stochastic or not is_narrower(dtype, x.dtype):
            return x.astype(dtype)
        bits = self.bits(field, x.shape)
        if x.dtype == jnp.float32 and dtype == jnp.bfloat16:
            return _stochastic_bfloat16(x, bits)
        return _stochastic(x, dtype, bits)

    def bits(self, field: int, shape: tuple[int, ...]) -> jax.Array | None:
        """32 uniform random bits per element of `shape` from field `field`'s stream, or None
        when rounding to nearest (8-bit codes draw from here as :meth:`store` does)."""
        if not self._step.stochastic:
            return None
        tag = _mix_int((self._tag * 31 + field) % 2**32)
        stream = _mix(self._step.step_bits() ^ jnp.uint32(tag))
        return _element_bits(stream, shape)


def _mix_int(x: int) -> int:
    """:func:`_mix` on a Python int, for constants."""
    mask = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)
