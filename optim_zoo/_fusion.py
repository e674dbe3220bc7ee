"""Compiler steering: how the updates steer XLA:CPU's buffer reuse, in one place, behind one switch.

An update is memory-bound: its floor is the bytes it must read and write. XLA:CPU gets close to
it only when every elementwise value is computed inside the loop that consumes it and every
state leaf is written in place. Seven habits of its compiler stand in the way, and each device
below answers one, without changing a value (up to the sign of a zero, or a reduction's order,
where a device says so):

* A reduction fuses no elementwise producer: a value that feeds both a reduction and an
  elementwise output (``g + wd * p`` from L2 decay, Adan's Nesterov gradient) is written to a
  temporary buffer as large as the leaf. :func:`own_copy` gives one consumer a copy of its own,
  which XLA then recomputes in that consumer's loop; :func:`mean_squares` squares inside each
  reduction instead of sharing one square.
* A donated state leaf is updated in place only when XLA can prove that every reader of the old
  value runs first; otherwise it copies the old value out (on CPU, a page fault per page of a
  fresh buffer). :func:`written_after` makes that order explicit.
* A value shared by a reduction and other consumers is kept in a temporary even when every
  consumer could recompute it, and XLA merges identical expressions into one shared value.
  :func:`decayed_for_reduction` spells L2 decay's ``g + wd * p`` another way for a reduction
  (:func:`decayed_for_means`: two ways, for two means), :func:`rebounded_for_reduction`
  a floored magnitude ``max(|x|, floor)``, and :func:`nesterov_for_means` Adan's Nesterov
  gradient for its two factored means.
* Independent reductions over large leaves all run at once, each with its temporary.
  :func:`measured_after` makes one wait for another, so their buffers can share memory.
* A maximum or a sum XLA:CPU hands to its reduction library (YNNPACK) fuses no select: a
  finite maximum, ``max(where(isfinite(m), m, 0))``, writes ``m`` out as large as the leaf.
  :func:`finite_block_max` (the scales of 8-bit codes) reduces with a reducer of its own, and
  so do :func:`coded_sum` and :func:`coded_mean_squares` (sums and means that read 8-bit codes,
  whose decoding selects NaN).
* Loops over different leaves are independent, and XLA:CPU schedules them as a whole: every
  leaf's reductions first, say, each with its temporary, which then all live at once (with
  8-bit state, the blocks' maxima of every coded leaf). :class:`InTurns` makes the leaves of
  one turn (about :data:`TURN_ELEMENTS` elements) wait for those of the turn before, so that
  their temporaries share memory.
* State stored narrower than the arithmetic (bfloat16) is widened where it is read, and XLA
  merges every widening of one array into a single value: read by two reductions, or by a
  reduction and a loop, it is written out in float32, twice the stored bytes.
  :func:`widened_for_reductions` gives each reduction a read of its own, behind :func:`apart`,
  which also makes a computed value's later readers take it from memory
  (:func:`computed_twice`).

Most devices are selects on a traced scalar that is never true, ``count < 0``, which XLA cannot
fold away; the selected value is always the original, non-finite values included. XLA also
merges identical expressions across leaves, so the scalars of :func:`own_scalar` (and of the
devices built on it) are the leaf's own, ``count < -i`` with ``i`` its index. Elementwise, so
sharded arrays stay sharded.

**The switch.** These devices pay on XLA:CPU (measured in ``docs/performance.md``) and nowhere
else has shown a gain: on GPU they would stand in the way of the sibling fusions XLA's GPU
compiler makes, and some add reads. :func:`steered` runs an update with the devices on for
the CPU and off elsewhere, chosen when the step is lowered (``jax.lax.platform_dependent``);
with them off each device is the plain expression it stands for. Outside ``jax.jit`` nothing
fuses, and they are off. :func:`compiler_steering` overrides the choice for the updates traced
inside it, which is how the benchmarks time both.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")

# --- The switch ---------------------------------------------------------------------------------

_local = threading.local()


def _context() -> Any:
    if not hasattr(_local, "override"):
        _local.override, _local.on, _local.count, _local.leaf = None, False, None, 0
    return _local


@contextlib.contextmanager
def _setting(**values: Any) -> Iterator[None]:
    """The switch's `values` (override, on, count, leaf) inside, the earlier ones after."""
    context = _context()
    saved = {key: getattr(context, key) for key in values}
    for key, value in values.items():
        setattr(context, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(context, key, value)


@contextlib.contextmanager
def compiler_steering(enabled: bool | None) -> Iterator[None]:
    """Turns optim_zoo's compiler steering on (True) or off (False) for updates traced inside.

    None restores the default: on when a step is compiled for the CPU, off for GPU and TPU. The
    setting is read when an update is traced, and ``jax.jit`` reuses a traced function: build
    and compile the step inside the ``with`` block (a new function for each setting). With the
    steering off, trajectories agree with those steered to float32 rounding (reductions may sum
    in another order). For benchmarks and for checking a compiler; training needs neither.

    Example:
      >>> import jax, jax.numpy as jnp, optim_zoo
      >>> tx = optim_zoo.adan(1e-3)
      >>> params = jnp.ones(4)
      >>> with optim_zoo.compiler_steering(False):
      ...     step = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(
      ...         params, tx.init(params), params).compile()
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"compiler_steering takes True, False or None, got {enabled!r}.")
    with _setting(override=enabled):
        yield


def steered(update: Callable[[], T], count: jax.Array | None, probe: Any) -> T:
    """``update()`` traced with the devices on where they pay: see the module docstring.

    `count` (the state's step count, or None for a stateless block) gives the devices their
    never-true scalars; `probe`, any array of the step, tells a traced step (``jax.jit``) from
    an eager one.
    """

    def run(on: bool) -> T:
        with _setting(on=on, count=count, leaf=0):
            return update()

    override = _context().override
    if override is not None:
        return run(override)
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(probe)):
        return run(False)
    return jax.lax.platform_dependent(cpu=lambda: run(True), default=lambda: run(False))


@contextlib.contextmanager
def at_leaf(index: int) -> Iterator[None]:
    """The devices called inside take the scalars of the leaf at `index`: ``count < -index``."""
    with _setting(leaf=index):
        yield


def _on() -> bool:
    return _context().on


def _never() -> jax.Array:
    """The step's never-true scalar, ``count < 0``."""
    return _context().count < 0


def _own_never() -> jax.Array:
    """The leaf's own never-true scalar, ``count < -i``."""
    context = _context()
    return context.count < -context.leaf


# --- The devices --------------------------------------------------------------------------------


def own_copy(x: jax.Array) -> jax.Array:
    """`x` itself, as an instruction of its own: this consumer recomputes it in its loop."""
    return written_after(x)


def written_after(x: jax.Array, *reads: jax.Array) -> jax.Array:
    """`x` itself, computed only after `reads` (scalars, or arrays shaped like `x`) exist.

    Reading `reads` in the loop that writes `x` orders that write after them, so a donated
    state leaf whose old value they read is overwritten in place. A scalar (a sum) costs
    nothing to read; an array is read whole, elementwise: one element would do, but on a mesh
    it lives on one device, and reading it everywhere reshards the state.
    """
    if not _on():
        return x
    late = _never()
    for read in reads:
        late = late & (read != 0)
    return jnp.where(late, jnp.zeros_like(x), x)


def mean_squares(
    x: jax.Array, axes: tuple[int, int] | None, y: jax.Array | None = None
) -> tuple[jax.Array, jax.Array] | None:
    """A factored second moment's two means, ``(mean(x**2, b), mean(y**2, a))`` for ``axes``
    ``(a, b)``, each squaring on its own; None for the plain expression (or no factoring).

    `y` defaults to `x`; given, it is `x` up to the sign of zeros, computed apart (see
    :func:`nesterov_for_means`). One shared ``x**2`` would be kept in a temporary buffer as
    large as `x`; squared inside each reduction (as ``|y| * |y|`` in the second, so XLA does not
    merge the two squares), it is not.
    """
    if not _on() or axes is None:
        return None
    y = x if y is None else y
    small_axis, large_axis = axes
    return (
        jnp.mean(jnp.square(x), axis=large_axis),
        jnp.mean(jnp.abs(y) * jnp.abs(y), axis=small_axis),
    )


def measured_after(x: jax.Array, previous: jax.Array) -> jax.Array:
    """`x` itself, read only once `previous`, a sum of squares (never negative), exists."""
    if not _on():
        return x
    return jnp.where(previous < 0, jnp.zeros_like(x), x)


# Elements a turn of :class:`InTurns` gathers before the next one waits for it, and the fewest
# a leaf must have to take part.
TURN_ELEMENTS = 2**20
TURN_MIN_LEAF = 2**17


class InTurns:
    """Leaves stepped in turns: each turn's leaves wait until the turn before is done.

    A turn is consecutive leaves of :data:`TURN_ELEMENTS` elements or more in all. A leaf of a
    turn reads what it waits on through :func:`written_after` on :meth:`after`, one scalar
    that exists once every array the leaves of the turn before named as done (:meth:`done`:
    their new scales, say) does. So the temporaries of one turn's loops are gone before the
    next turn's begin, and a step's temporaries stay about those of two turns, whatever the
    number of leaves; within a turn, loops stay free to run at once. Leaves of fewer than
    :data:`TURN_MIN_LEAF` elements take no part: with every leaf taking part, an 8-bit Adan
    step on 200 leaves of 64 x 128, 100 of 128 x 256 and 60 of 256 x 512 took 1.21x, 1.06x
    and 1.02x as long as without turns; on 40 of 256 x 1024, 0.96x. Only on one device, where
    the scalar is no collective, and for the primitives that take turns (``_leafwise.transform``'s
    ``in_turns``; CAME's step took 1.06x as long in turns, for no memory on the 30M tree). See
    docs/eight_bit_state.md, "What it costs".
    """

    def __init__(self) -> None:
        self._previous: jax.Array | None = None
        self._turn: list[jax.Array] = []
        self._elements = 0

    def after(self, elements: int) -> jax.Array | None:
        """The scalar a leaf of `elements` elements waits for: None in the first turn, for a
        small leaf, and with the devices off or more than one device (:meth:`done` then
        records nothing)."""
        return None if elements < TURN_MIN_LEAF else self._previous

    def done(self, elements: int, arrays: list[jax.Array]) -> None:
        """A leaf of `elements` elements is done once `arrays` exist: results of reductions
        (one element of an elementwise value, XLA may compute by itself, ordering nothing)."""
        arrays = [x for x in arrays if x.size]
        if elements < TURN_MIN_LEAF or not arrays or not _own_reducer_on():
            return
        self._turn += [x.reshape(-1)[0] != 0 for x in arrays]
        self._elements += elements
        if self._elements >= TURN_ELEMENTS:
            previous = self._turn[0]
            for x in self._turn[1:]:
                previous = previous | x
            self._previous, self._turn, self._elements = previous, [], 0


def own_scalar(value: jax.typing.ArrayLike) -> jax.Array:
    """`value` (a scalar, dtype and weak type kept) passed through a select on the leaf's own
    never-true scalar.

    A constant that several reductions multiply by is broadcast once and written out as large
    as the leaf; each reduction's own scalar is broadcast inside its loop.
    """
    value = jnp.asarray(value)
    if not _on():
        return value
    return jnp.where(_own_never(), jnp.zeros_like(value), value)


def decayed_for_reduction(
    g: jax.Array, p: jax.Array, weight_decay: jax.typing.ArrayLike
) -> jax.Array:
    """``g + weight_decay * p``, bit for bit, as ``g - (-weight_decay) * p``: for a reduction.

    Negating a factor negates a product exactly, and subtracting a negated value is adding it,
    so every element is the same float (in any dtype, and for any decay, traced ones included).
    As a different expression it is not merged with the elementwise consumers' ``g + wd * p``,
    so it has the reduction as its only consumer, which fuses it instead of reading a
    temporary as large as the leaf. ``-weight_decay`` passes through :func:`own_scalar`.
    """
    if not _on():
        return g + weight_decay * p
    return g - own_scalar(-weight_decay) * p


def decayed_for_means(
    g: jax.Array,
    p: jax.Array,
    weight_decay: jax.typing.ArrayLike,
    dtype: jnp.dtype,
    axes: tuple[int, int] | None,
) -> tuple[jax.Array, jax.Array] | None:
    """A factored second moment's two means of ``(g + weight_decay * p)**2`` in `dtype`, each
    from its own copy of the decayed gradient, bit for bit; or None for the plain expression.

    The copies are :func:`decayed_for_reduction`, and ``g + wd' * p`` with ``wd'`` the decay
    passed through :func:`own_scalar`: each a different expression from the other and from the
    elementwise consumers' ``g + wd * p``, so that each mean computes its copy in its own loop.
    Not for a gradient narrower than `dtype`: XLA rounds a narrow sum differently in each.
    """
    if not _on() or axes is None or g.dtype != dtype:
        return None
    row = decayed_for_reduction(g, p, weight_decay).astype(dtype)
    col = (g + own_scalar(weight_decay) * p).astype(dtype)
    return mean_squares(row, axes, col)


def rebounded_for_reduction(x: jax.Array, floor: jax.typing.ArrayLike) -> jax.Array:
    """``max(|x|, floor)``, bit for bit, as ``max(|-x|, floor')``: for a reduction.

    ``|-x|`` is ``|x|`` in every bit, and ``floor'`` is `floor` passed through
    :func:`own_scalar`. As different instructions they are merged neither with the elementwise
    consumers' ``max(|x|, floor)`` nor with its broadcast of a constant `floor` (which XLA would
    then write out as large as `x`), so the reduction reads `x` from memory and computes the
    rest in its own loop instead of reading a temporary as large as the leaf.
    """
    if not _on():
        return jnp.maximum(jnp.abs(x), floor)
    return jnp.maximum(jnp.abs(-x), own_scalar(jnp.asarray(floor, x.dtype)))


def _zeroed_for_reduction(x: jax.Array, zero: jax.Array, spelling: int) -> jax.Array:
    """``where(zero, 0, x)`` for a reduction, as `x` clamped to scalar bounds: ``[0, 0]`` when
    the scalar `zero` holds, ``[-inf, inf]`` (`x` itself, bit for bit) otherwise; the bounds
    pass through :func:`own_scalar`.

    A reduction fuses a maximum and a minimum with scalar bounds but not a select, which it
    would read from a temporary as large as `x`. Equal to the select up to the sign of a zero,
    except where `x` is NaN and `zero` holds: the clamp keeps the NaN. Copies with different
    `spelling` (0 or 1) bound by 0 and -0 respectively, so that XLA does not merge the bounds of
    two reductions into one array.
    """
    bound = jnp.asarray(-0.0 if spelling else 0.0, x.dtype)
    low = own_scalar(jnp.where(zero, bound, -jnp.inf))
    high = own_scalar(jnp.where(zero, bound, jnp.inf))
    return jnp.minimum(jnp.maximum(x, low), high)


def nesterov_for_means(
    g: jax.Array,
    prev_grad: jax.Array,
    b2: jax.typing.ArrayLike,
    is_first: jax.Array,
    axes: tuple[int, int] | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Adan's factored means: the gradient for the elementwise loops, and the two means of the
    squared Nesterov gradient ``g + b2 * diff``, each spelling it on its own; or `g` and None
    for the plain expression.

    Each mean computes ``g + b2 * (g - prev_grad)``, zeroed on the first step, from `g` and the
    stored `prev_grad` in its own loop: the first as ``g + b2' * (g - prev)``, the second as
    ``g + (-b2)' * (prev - g)`` (equal up to the sign of zeros, which they square), with their
    own scalars and their own widenings of `prev_grad`; the elementwise loops get their own
    copy of `g`.
    """
    if not _on() or axes is None:
        return g, None
    dtype = g.dtype
    coded = not isinstance(prev_grad, jax.Array)  # 8-bit codes: each mean decodes them
    b2_row, b2_col = own_scalar(b2), own_scalar(-b2)
    prev_row, prev_col = widened_for_reductions(prev_grad, dtype, 2, codes_apart=coded)
    row = g + b2_row * _zeroed_for_reduction(g - prev_row, is_first, 0)
    col = g + b2_col * _zeroed_for_reduction(prev_col - g, is_first, 1)
    return own_copy(g), (coded_mean_squares if coded else mean_squares)(row, axes, col)


def _larger_finite(a: jax.Array, b: jax.Array) -> jax.Array:
    """A reducer: `b` where it is finite and above `a`, else `a` (NaN and infinities skipped)."""
    return jnp.where((b > a) & (b < jnp.inf), b, a)


def finite_block_max(magnitudes: jax.Array) -> jax.Array:
    """The largest finite value along the last axis (0 where there is none), for magnitudes
    (``|x|``, never negative) laid out as (..., blocks, block): 8-bit codes' scales.

    Spelled plainly, ``max(where(isfinite(m), m, 0))``, XLA:CPU hands the maximum to its
    reduction library, which fuses no select: it writes the magnitudes out as large as the
    leaf, computed in a loop of their own, and reads them back. Reduced instead with a reducer
    of its own (:func:`_larger_finite`, which skips what is not finite and which the library
    does not take) over 8 strided windows of each block (elements ``j, j + b/8, ...``, so that
    the loop runs over contiguous results), then with a plain maximum over the windows'
    results, the reduction computes the magnitudes in its own loop. Contiguous windows of 8
    were 7% slower for Adan's 8-bit step (and windows of 4 slower still; of 16 or 32 they ran
    3x slower). The maximum is exact, so the value is the same in every bit. Plain where JAX
    has more than one device, unless the magnitudes' type shards them over explicit mesh axes
    with each block on one device (:func:`_own_reducer_on`; ``_codes._in_blocks`` gathers a
    block that would straddle two).
    """
    dtype = magnitudes.dtype
    block = magnitudes.shape[-1]
    if not _own_reducer_on(magnitudes, (magnitudes.ndim - 1,)) or block % 8:
        return jnp.max(jnp.where(jnp.isfinite(magnitudes), magnitudes, 0), axis=-1)
    windows = magnitudes.reshape(*magnitudes.shape[:-1], 8, block // 8)
    zero = jnp.zeros((), dtype)
    largest = jax.lax.reduce(windows, zero, _larger_finite, (windows.ndim - 2,))
    return jnp.max(largest, axis=-1)


def _own_reducer_on(x: jax.Array | None = None, axes: tuple[int, ...] = ()) -> bool:
    """Whether a reduction (of `x` over `axes`, if given) may take a reducer of its own: with
    the devices on, and on one device, or where `x`'s type shards it over explicit mesh axes,
    none of them along `axes`, so that each device reduces its own shard. (XLA:CPU's
    collectives, which split a reduction across devices, take only the standard reducers: with
    one of its own, such a step failed to compile. With auto axes the sharding is the
    compiler's, unknown when the step is traced.)"""
    if not _on():
        return False
    if jax.device_count() == 1:
        return True
    return x is not None and bool(axes) and all(_explicit_shards(x, a) == 1 for a in axes)


def _explicit_shards(x: jax.Array, axis: int) -> int | None:
    """Into how many shards `x`'s type splits `axis` over explicit mesh axes; None where the
    type carries no explicit sharding."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", ())
    if not types or any(t != jax.sharding.AxisType.Explicit for t in types):
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    names = spec[axis]
    names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    return math.prod(mesh.shape[name] for name in names)


def _added(a: jax.Array, b: jax.Array) -> jax.Array:
    """A reducer: ``a + b`` (NaN where `b` is), spelled so that the library does not take it."""
    return jnp.where(b == b, a + b, b)


def coded_sum(x: jax.Array) -> jax.Array:
    """``jnp.sum(x)``, for an `x` computed from 8-bit codes: the decoding inside the sum's loop.

    A plain sum goes to XLA:CPU's reduction library, which fuses no select (the reserved
    code's NaN, in every decoding): each decoded field is written out as large as the leaf and
    read back. Reduced instead with a reducer of its own (:func:`_added`) over windows of 512
    consecutive elements, each into 64 partial sums (elements ``j, j + 64, ..., j + 448``),
    then with a plain sum over the partial sums, the sum computes `x` in its own loop. Three
    sums over eight decoded 8192 x 512 leaves took 29 to 35 ms this way against 64 to 73 ms
    plainly; with 32 or 128 partial sums a window 47 and 42 ms, reduced over all rows at once
    101 ms, in one flat reduction 157 ms. The additions run in another order: the same value
    up to float rounding. With float32 state it made Apollo's step 1.22x as long, so only
    sums that read codes take it (``Leaf.sum``; docs/eight_bit_state.md, "What it costs").
    Plain where the devices are off and where `x`'s size is not a multiple of 512. Where JAX
    has more than one device, plain too, unless `x`'s type shards it over explicit mesh axes
    with whole windows of 8 consecutive elements of its last axis on each device: each device
    then reduces its own windows with :func:`_added`, and the plain sum of what they leave adds
    across the devices.
    """
    zero = jnp.zeros((), x.dtype)
    shards = _explicit_shards(x, -1) if jax.device_count() > 1 and x.ndim else None
    if shards is not None and not x.shape[-1] % (8 * shards):
        windows = x.reshape(*x.shape[:-1], x.shape[-1] // 8, 8)
        if _own_reducer_on(windows, (x.ndim,)):
            return jnp.sum(jax.lax.reduce(windows, zero, _added, (x.ndim,)))
    if not _own_reducer_on() or x.size % 512:
        return jnp.sum(x)
    windows = x.reshape(-1, 8, 64)
    return jnp.sum(jax.lax.reduce(windows, zero, _added, (1,)))


def _coded_mean(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.mean(x, axis)`` with :func:`_added` over 8 strided windows of the axis, then a
    plain sum over what they leave (an eighth of `x`); plain where its length is not a multiple
    of 8."""
    length = x.shape[axis]
    if length % 8:
        return jnp.mean(x, axis=axis)
    axis %= x.ndim
    windows = x.reshape(*x.shape[:axis], 8, length // 8, *x.shape[axis + 1 :])
    partial = jax.lax.reduce(windows, jnp.zeros((), x.dtype), _added, (axis,))
    return jnp.sum(partial, axis=axis) / length


def coded_mean_squares(
    x: jax.Array, axes: tuple[int, int] | None, y: jax.Array
) -> tuple[jax.Array, jax.Array] | None:
    """:func:`mean_squares` of values computed from 8-bit codes, each mean decoding in its loop:
    ``(mean(x**2, b), mean(y**2, a))`` for `axes` ``(a, b)``, `y` equal to `x` but decoded apart
    (:func:`widened_for_reductions` with ``codes_apart``).

    The library's reductions fuse no select (the reserved code's NaN), so a decoded value two
    means read is written out as large as the leaf (CAME: its new momentum, and the instability
    computed from it). Each mean instead reduces with :func:`_added` over 8 windows of its axis,
    elements ``j, j + L/8, ...`` of an axis of length ``L`` (as :func:`coded_sum`), and sums the
    eighth of the leaf they leave plainly. The additions run in another order: the same means up
    to float rounding. :func:`mean_squares` where the devices are off or JAX has more than one
    device.
    """
    if not _own_reducer_on() or axes is None:
        return mean_squares(x, axes, y)
    small_axis, large_axis = axes
    return _coded_mean(jnp.square(x), large_axis), _coded_mean(jnp.square(y), small_axis)


def apart(x: Any) -> Any:
    """`x` (an array or a tuple of them) itself, as a value XLA neither merges nor looks through.

    An identity, ``jax.lax.optimization_barrier``: XLA does not merge it with another read of
    `x`, and does not fuse the computation of `x` into its readers, which read `x` from memory.
    """
    if not _on():
        return x
    return jax.lax.optimization_barrier(x)


def widened_for_reductions(
    x: jax.Array,
    dtype: jax.typing.DTypeLike,
    count: int,
    exact_sum: bool = False,
    codes_apart: bool = False,
) -> list[jax.Array]:
    """`count` copies of `x` in `dtype`, bit for bit, one for each reduction that reads it.

    For `x` stored narrower than `dtype`: each copy is read through one more :func:`apart`
    than the one before, so that neither the copies nor the other readers of `x` share a
    widened array, which XLA would write out as large as the leaf in `dtype`; each reduction
    reads the stored bytes and widens them in its own loop. `x` already in `dtype`: `x`
    itself, `count` times.

    `exact_sum` for a reduction that sums a copy as it is: each copy is then multiplied by its
    own one (an exact product), since over a bare widening XLA:CPU sums in another order than
    over the same values in `dtype`, for some shapes (a 384 x 1024 bfloat16 leaf among them).

    8-bit codes (a ``CodedState``) are decoded where read. The library's reductions fuse no
    select, the reserved code's NaN, so by default the copies share one decoded array; with
    `codes_apart`, for reductions that decode in their own loops (:func:`coded_sum`), each
    copy is its own, as for bfloat16.
    """
    dtype = jnp.dtype(dtype)
    coded = not isinstance(x, jax.Array)  # 8-bit codes
    if coded and not codes_apart:  # one decoded copy, shared
        return [x.astype(dtype)] * count
    if not coded and x.dtype == dtype:
        return [x] * count
    if not _on():
        return [x.astype(dtype)] * count
    copies = []
    for i in range(count):
        x = apart(x)
        copy = x.astype(dtype)
        if exact_sum:
            copy = copy * jnp.where(_own_never(), jnp.asarray(i + 2, dtype), jnp.asarray(1, dtype))
        copies.append(copy)
    return copies


def computed_twice(fn: Callable[..., jax.Array], *inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``fn(*inputs)`` twice, each computing from `inputs` read from memory: for two outputs.

    One value shared by two outputs of different dtypes (the update, and the state stored
    narrower) is written out as large as the leaf; computed in each output's loop from the
    stored inputs, it is not. Off: one value, returned twice.
    """
    if not _on():
        value = fn(*inputs)
        return value, value
    inputs = apart(inputs)
    return fn(*inputs), fn(*apart(inputs))
