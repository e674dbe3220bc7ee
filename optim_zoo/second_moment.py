r"""The second-moment estimator: an EMA of a squared quantity, kept full or factored.

Adafactor, factored Adan and factored Adai keep their second moment this way, and plain Adan
and Adai keep theirs full through the same code. One vocabulary throughout:

* the **second moment** of a tree is what a state field holds: either a tree like the params
  with one full EMA per leaf (the layout of optax's Adam), or a :class:`FactoredSecondMoment`,
  three per-leaf tuples ``(v_row, v_col, v)``;
* a **leaf moment** (:class:`LeafMoment`) is one leaf's part of it, with the axes it is
  factored over: a full ``v``, or a row ``R`` and a column ``C``;
* a **factoring** (:class:`Factoring`) is the rule that decides, at ``init``, which leaves are
  factored and over which two axes ``(a, b)``. ``R`` is the EMA of the mean over ``b``, ``C``
  the EMA of the mean over ``a``, and the estimate is :math:`(R / \mathrm{mean}_a(R)) \otimes
  C`, the rank-one reconstruction of Adafactor. Other axes are batch axes.

The rules (``factoring=``): ``"largest_two"``, the two largest axes, factored only when the
smaller of them has at least ``min_dim_size_to_factor`` elements (optax's rule, the default);
``"last_two"``, the last two axes of every leaf of rank >= 2, whatever their sizes
(tensor2tensor's and CAME's rule); or a callable ``(path, shape) -> (a, b) | None`` of the
leaf's key path and shape, for example to keep a stack of scanned layers from being averaged
across layers, or :func:`optim_zoo.pytorch_last_two`, the axes PyTorch code's ``"last_two"``
factors, on Flax's kernel layouts. Leaves of rank < 2 or with a zero-size axis are never
factored.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_zoo import _checks, _codes, _dtypes, _fusion, _shards, _tree

LARGEST_TWO = "largest_two"
LAST_TWO = "last_two"
FactoringRule = str | Callable[[tuple, tuple[int, ...]], tuple[int, int] | None]


class FactoredSecondMoment(NamedTuple):
    """A second moment kept per leaf, factored where the factoring rule says so.

    The second moment of :func:`optim_zoo.scale_by_nesterov_moment` and
    :func:`optim_zoo.scale_by_adaptive_inertia` with ``factored=True``, and the layout of
    :class:`optim_zoo.ScaleByFactoredRmsState`. Each field is a ``PerLeaf`` tuple with one entry
    per parameter leaf, in ``jax.tree.leaves`` order (it also remembers the leaves' keys, so
    that ``update`` refuses a gradient tree other than the one ``init`` saw), and ``None`` where
    a leaf does not use that statistic: a factored n x m matrix holds n + m floats, any other
    leaf a full array. Each statistic is sharded like its parameter minus the reduced axis.
    """

    v_row: tuple[jax.Array | None, ...]  # EMA of the mean square over axis b of each leaf.
    v_col: tuple[jax.Array | None, ...]  # EMA of the mean square over axis a.
    v: tuple[jax.Array | None, ...]  # full EMA of the square, for leaves not factored.


class Factoring(NamedTuple):
    """The factoring rule: which leaves are factored, over which axes (see the module doc)."""

    factored: bool = True  # False: no leaf is factored.
    min_dim_size_to_factor: Any = 128  # used by the "largest_two" rule only.
    rule: FactoringRule = LARGEST_TWO


def checked_factoring(factored: Any, min_dim_size_to_factor: Any, factoring: Any) -> Factoring:
    """A primitive's three factoring options, validated, as a :class:`Factoring`.

    Raises naming the argument: `factored` must be a bool, `min_dim_size_to_factor` a number
    >= 0, and `factoring` ``"largest_two"``, ``"last_two"`` or a callable (in the
    ``static_args`` of ``optax.inject_hyperparams``, which takes callables for schedules).
    """
    _checks.check_flag("factored", factored)
    _checks.check_interval("min_dim_size_to_factor", min_dim_size_to_factor, 0)
    if not callable(factoring):
        _checks.check_not_scheduled("factoring", factoring)
        _checks.check_choice("factoring", factoring, (LARGEST_TWO, LAST_TWO))
    return Factoring(factored, min_dim_size_to_factor, factoring)


def factored_dims(
    shape: tuple[int, ...],
    *,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    factoring: FactoringRule = LARGEST_TWO,
    path: tuple = (),
) -> tuple[int, int] | None:
    """The axes ``(a, b)`` a leaf's second moment is factored over, or None when it is not.

    With the default rule, ``(a, b)`` are the two largest axes, ``b`` the larger (ties to the
    later axis), and the leaf is factored when ``shape[a] >= min_dim_size_to_factor``; with
    ``"last_two"`` they are the last two axes; a callable rule is called with `path` and
    `shape`. A leaf with fewer than two axes or a zero-size axis is never factored.
    """
    if not factored or len(shape) < 2 or 0 in shape:
        return None
    axes = _rule_axes(factoring, path, shape)
    if factoring == LARGEST_TWO and shape[axes[0]] < min_dim_size_to_factor:
        return None
    return axes


def pytorch_last_two(path: tuple, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """A ``factoring`` rule: the axes PyTorch code factors, on a Flax-layout leaf.

    The official CAME and Hugging Face's Adafactor factor the last two axes of a tensor as
    PyTorch stores it: ``(out, in)`` for a linear layer, the kernel's spatial axes for a
    convolution (``(out, in, *spatial)``: H and W of an OIHW kernel). Flax stores kernels as
    ``(in, out)`` and ``(*spatial, in, out)`` (HWIO), where ``"last_two"`` factors ``(in, out)``
    instead. This rule reads a leaf of rank >= 3 as a Flax convolution kernel and returns the
    axes of PyTorch's last two, as ``(a, b)`` with ``b`` PyTorch's last (so ``v_row`` holds
    PyTorch's ``exp_avg_sq_row``, laid out the Flax way): ``(1, 0)`` for a matrix, ``(1, 0)``
    for a 1-D convolution ``(W, I, O)``, ``(0, 1)`` for HWIO, ``(r - 4, r - 3)`` for rank
    ``r >= 4``. Like ``"last_two"``, it factors every leaf of rank >= 2 whatever its sizes.
    A leaf of rank >= 3 that is not a convolution kernel (a stack of scanned layers, a
    ``DenseGeneral`` kernel) needs a rule of its own, for example by its path.

    Args:
      path: the leaf's key path (not used: the rule depends on the shape alone).
      shape: the leaf's shape.

    Returns:
      ``(a, b)``, or None for a leaf of rank < 2.

    Example:
      >>> import optim_zoo
      >>> optim_zoo.pytorch_last_two((), (3, 3, 16, 32))  # HWIO: PyTorch's H and W
      (0, 1)
      >>> optim_zoo.pytorch_last_two((), (16, 32))  # Dense (in, out): PyTorch's (out, in)
      (1, 0)
      >>> tx = optim_zoo.came(1e-4, factoring=optim_zoo.pytorch_last_two)
    """
    del path
    rank = len(shape)
    if rank < 2:
        return None
    # PyTorch's axis p of (out, in, *spatial) is Flax's axis p - 2 of (*spatial, in, out),
    # except out (p = 0: Flax's last) and in (p = 1: Flax's second to last).
    flax_axis = {0: rank - 1, 1: rank - 2}
    return flax_axis.get(rank - 2, rank - 4), flax_axis.get(rank - 1, rank - 3)


def _rule_axes(rule: FactoringRule, path: tuple, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The axes `rule` factors a leaf of rank >= 2 over, before any size threshold."""
    if callable(rule):
        return _checked_axes(rule(path, tuple(shape)), shape, path)
    if rule == LAST_TWO:
        return len(shape) - 2, len(shape) - 1
    return _largest_axes(shape)


def _largest_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(small_axis, large_axis)``: the two largest axes of `shape`, ties to the later axis."""
    order = np.argsort(shape, kind="stable")  # stable: among equal sizes, later axes sort last.
    return int(order[-2]), int(order[-1])


def _checked_axes(axes: Any, shape: tuple[int, ...], path: tuple) -> tuple[int, int] | None:
    """A callable rule's answer as two distinct non-negative axes of `shape`, or None."""
    if axes is None:
        return None
    where = jax.tree_util.keystr(path) or "(the root)"
    rank = len(shape)
    try:
        if any(isinstance(x, bool | np.bool_) for x in axes):
            raise TypeError
        a, b = (operator.index(x) for x in axes)
    except (TypeError, ValueError):
        a = b = None
    if a is None or not (-rank <= a < rank and -rank <= b < rank) or a % rank == b % rank:
        raise ValueError(
            f"factoring must return None or two distinct axes of the leaf, got {axes!r} for "
            f"{where} of shape {tuple(shape)}."
        )
    return a % rank, b % rank


def _stored_axes(
    leaf: tuple[jax.Array | None, ...], factoring: Factoring, path: tuple, shape: tuple[int, ...]
) -> tuple[int, int] | None:
    """The axes of a leaf whose statistics are `leaf`: ``update`` reads the layout from them.

    ``init`` decided which leaves are factored; a factored leaf (one with a row statistic) is
    factored over the axes the rule gives for its shape, so a traced ``min_dim_size_to_factor``
    never reaches a Python ``if`` in ``update``.
    """
    if leaf[0] is None:
        return None
    axes = _rule_axes(factoring.rule, path, shape)
    if axes is None:  # only a callable rule answers None
        where = jax.tree_util.keystr(path) or "(the root)"
        raise ValueError(
            f"factoring returned None for {where}, which it factored at init: the rule must "
            "be a function of the path and shape alone."
        )
    return axes


class LeafMoment(NamedTuple):
    """One leaf's second moment: a full ``v``, a row ``R`` and a column ``C``, or nothing.

    A leaf that holds nothing (``init(..., factored_only=True)`` on a leaf not factored) must
    not be accumulated; :attr:`is_empty` tells.
    """

    row: jax.Array | None
    col: jax.Array | None
    full: jax.Array | None
    axes: tuple[int, int] | None  # (a, b) when factored: R lacks axis b, C lacks axis a.

    def accumulate(
        self,
        x: jax.Array,
        decay: jax.typing.ArrayLike,
        eps: jax.typing.ArrayLike | None = None,
        means: tuple[jax.Array, jax.Array] | None = None,
    ) -> LeafMoment:
        """One EMA step of ``x**2 (+ eps)``, in the dtype of `x` (cast back with `stored_as`).

        Factored, the row takes ``mean(x**2)`` over axis b and the column over axis a; `means`
        gives those two means computed another way (the compiler steering's, `_fusion`), equal
        to them.
        """
        if self.axes is None:
            square = jnp.square(x) if eps is None else jnp.square(x) + eps
            full = decay * self.full.astype(x.dtype) + (1 - decay) * square
            return self._replace(full=full)
        row_old, col_old = self.row.astype(x.dtype), self.col.astype(x.dtype)
        if means is None:
            square = jnp.square(x)
            means = jnp.mean(square, axis=self.axes[1]), jnp.mean(square, axis=self.axes[0])
        row_square, col_square = means
        if eps is not None:  # mean(x**2) + eps is mean(x**2 + eps) up to rounding.
            row_square, col_square = row_square + eps, col_square + eps
        row = decay * row_old + (1 - decay) * row_square
        col = decay * col_old + (1 - decay) * col_square
        return self._replace(row=row, col=col)

    def check_shape(self, shape: tuple[int, ...], name: str, key: str) -> None:
        """Raises `ValueError` where these statistics cannot be those of a leaf of `shape`.

        A factored leaf's row and column keep no record of the leaf's own shape: a matrix's
        transpose, factored over the swapped axes, has statistics of the same shapes.
        """
        if self.full is not None:
            _tree.check_leaf_shape(name, key, shape, self.full.shape)
        elif self.axes is not None:
            a, b = self.axes
            if (self.row.shape, self.col.shape) != (_without(shape, b), _without(shape, a)):
                raise ValueError(
                    f"{name}: the update of {key or '(the root)'} has shape {tuple(shape)}, "
                    f"but the state's factored statistics, of shapes {self.row.shape} and "
                    f"{self.col.shape}, were initialised for another shape."
                )

    @property
    def is_empty(self) -> bool:
        """True for a leaf without statistics."""
        return self.row is None and self.full is None

    def arrays(self) -> list[jax.Array]:
        """The statistics this leaf holds."""
        return [x for x in self[:3] if x is not None]

    def astype(self, dtype: jax.typing.DTypeLike) -> LeafMoment:
        """The statistics in `dtype` (a no-op for those already in it)."""
        row, col, full = (None if x is None else x.astype(dtype) for x in self[:3])
        return LeafMoment(row, col, full, self.axes)

    def for_reduction(self, dtype: jax.typing.DTypeLike) -> LeafMoment:
        """The statistics in `dtype`, bit for bit, for one reduction that sums them.

        Each reads its stored array apart from every other reader
        (`_fusion.widened_for_reductions`): a statistic stored narrower than `dtype` and
        widened once for the sum and for the loops would be written out as large as the leaf.
        """
        row, col, full = (
            None if x is None else _fusion.widened_for_reductions(x, dtype, 1, True)[0]
            for x in self[:3]
        )
        return LeafMoment(row, col, full, self.axes)

    def stored_as(
        self, old: LeafMoment, store: Callable[..., jax.Array] | None = None, field: int = 0
    ) -> LeafMoment:
        """The statistics as `old`, the stored ones, store them (a dtype, or 8-bit codes).

        Stored with ``store(x, old_x, field)`` when given (``Leaf.store``'s; the row, column and
        full statistics are its fields `field`, `field` + 1 and `field` + 2), else cast with
        ``astype`` to each one's dtype.
        """
        stored = []
        for i, (x, o) in enumerate(zip(self[:3], old[:3], strict=True)):
            if x is None:
                stored.append(None)
            else:
                stored.append(x.astype(o.dtype) if store is None else store(x, o, field + i))
        return LeafMoment(*stored, self.axes)

    def broadcastable(self) -> list[jax.Array]:
        """The statistics, each expanded to broadcast against the leaf (to order writes)."""
        if self.axes is None:
            return [self.full]
        small_axis, large_axis = self.axes
        return [jnp.expand_dims(self.row, large_axis), jnp.expand_dims(self.col, small_axis)]

    def factors(
        self, fn: Callable[[jax.Array], jax.Array] = lambda x: x
    ) -> tuple[jax.Array, jax.typing.ArrayLike]:
        r"""Two factors that broadcast against the leaf; ``fn`` of the estimate is their product.

        For a factored leaf the estimate is :math:`V = (R / \mathrm{mean}_a(R)) \otimes C`,
        taken as zero where :math:`\mathrm{mean}_a(R) = 0` (every gradient seen so far is zero),
        and as infinite where it overflowed to infinity (instead of tensor2tensor's
        :math:`\infty / \infty` = NaN), so that a step divided by :math:`\sqrt V` is zero there,
        as it is for a full second moment that overflows. A NaN statistic stays NaN. The factors
        are ``fn`` of the two vectors, expanded: right for any ``fn`` with
        ``fn(a b) = fn(a) fn(b)``, such as the identity or ``rsqrt``. Unfactored: ``fn(v)``, 1.
        """
        if self.axes is None:
            return fn(self.full), 1
        small_axis, large_axis = self.axes
        # `row` lost `large_axis`: find `small_axis` among its remaining axes.
        row_mean = jnp.mean(self.row, axis=small_axis - (small_axis > large_axis), keepdims=True)
        overflow = jnp.isinf(row_mean)
        row_ratio = jnp.where(row_mean == 0, 0, self.row / jnp.where(row_mean == 0, 1, row_mean))
        row_ratio = jnp.where(overflow, jnp.inf, row_ratio)
        # `overflow` has row's axes; as col's: back to the leaf's axes, then drop small_axis.
        col = jnp.where(jnp.squeeze(jnp.expand_dims(overflow, large_axis), small_axis), 1, self.col)
        return (
            jnp.expand_dims(fn(row_ratio), large_axis),
            jnp.expand_dims(fn(col), small_axis),
        )

    def total(self, summation: Callable[[jax.Array], jax.Array] = jnp.sum) -> jax.Array:
        """The sum of every element of the estimate, without forming it; a full statistic's
        with `summation` (``Leaf.sum``)."""
        row_part, col_part = self.factors()
        if self.axes is None:
            return summation(row_part)
        small_axis, large_axis = self.axes
        # Sum over both factored axes of an outer product: the product of the two sums, per batch.
        return jnp.sum(
            jnp.sum(row_part, axis=small_axis, keepdims=True)
            * jnp.sum(col_part, axis=large_axis, keepdims=True)
        )


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(shape[:axis]) + tuple(shape[axis + 1 :])


def _zeros_without_axis(param: Any, axis: int, dtype: jnp.dtype) -> jax.Array:
    """Zeros shaped like `param` reduced over `axis`, sharded like `param` minus that axis.

    With explicit mesh axes the sharding is part of the type, so `jax.eval_shape` of the
    reduction already carries it (also under `jax.jit` and `jax.eval_shape`). With auto axes it
    is not: a concrete `param` with a `NamedSharding` then gives its spec with `axis` dropped, so
    that a factored row or column is sharded as the matrix it summarises, never replicated. A
    tracer with auto axes has no sharding to read; the compiler, or the caller's
    `out_shardings`, decides there, as for every other state leaf.

    Example (8 devices, a (2, 4) mesh with auto axes)::

      w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", "model")))
      _zeros_without_axis(w, 1, jnp.float32).sharding.spec  # P('data',)
    """
    target = jax.eval_shape(lambda p: jnp.mean(p, axis=axis).astype(dtype), param)
    if target.sharding is not None or isinstance(param, jax.core.Tracer):
        return _shards.zeros_placed(target, param)
    sharding = getattr(param, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return jnp.zeros_like(target)  # One device, or no per-axis spec to drop an axis from.
    spec = list(sharding.spec) + [None] * (len(param.shape) - len(sharding.spec))
    del spec[axis]
    reduced = jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*spec), memory_kind=sharding.memory_kind
    )
    return jnp.zeros(target.shape, target.dtype, device=reduced)


def init(
    params: optax.Params,
    factoring: Factoring | None,
    dtype_second_moment: jnp.dtype | None,
    *,
    factored_only: bool = False,
) -> optax.Params | FactoredSecondMoment:
    """A zero second moment for `params`.

    With `factoring` None, a tree like the params (one full EMA per leaf); with a
    :class:`Factoring`, a :class:`FactoredSecondMoment` laid out as its rule decides, where a
    leaf that is not factored keeps a full EMA, or with `factored_only` no statistic at all
    (CAME's confidence keeps none for vectors). The dtype is `dtype_second_moment`, or at least
    float32 when it is None.
    """
    if factoring is None:
        return _tree.second_moment_zeros(params, dtype_second_moment)
    if _tree.is_params_placeholder(params):
        return FactoredSecondMoment(*(_tree.PER_LEAF_PLACEHOLDER,) * 3)
    min_dim_size_to_factor = 0
    if factoring.factored and factoring.rule == LARGEST_TWO:
        min_dim_size_to_factor = _checks.static_int(
            "min_dim_size_to_factor", factoring.min_dim_size_to_factor
        )
    v_row, v_col, v = [], [], []
    for path, p in _tree.leaves_with_paths(params):
        axes = factored_dims(
            p.shape,
            factored=factoring.factored,
            min_dim_size_to_factor=min_dim_size_to_factor,
            factoring=factoring.rule,
            path=path,
        )
        dtype = _dtypes.stats_dtype(p.dtype, dtype_second_moment)
        if axes is None:
            v_row.append(None)
            v_col.append(None)
            v.append(None if factored_only else _tree.second_moment_zeros(p, dtype_second_moment))
        else:
            if _codes.is_code_dtype(dtype):  # factored statistics are small: never codes
                dtype = _dtypes.stats_dtype(p.dtype)
            small_axis, large_axis = axes
            v_row.append(_zeros_without_axis(p, large_axis, dtype))
            v_col.append(_zeros_without_axis(p, small_axis, dtype))
            v.append(None)
    keys = _tree.leaf_keys(params)
    return FactoredSecondMoment(*(_tree.PerLeaf(stat, keys) for stat in (v_row, v_col, v)))


def leaf_moments(
    moment: Any, updates: optax.Updates, factoring: Factoring | None, name: str
) -> _tree.PerLeaf:
    """Per leaf of `updates`, its :class:`LeafMoment`, as a ``PerLeaf`` tuple.

    `moment` is a second moment made by :func:`init` with the same `factoring` (or a state
    with its ``v_row``, ``v_col`` and ``v`` fields). Raises `ValueError` naming `name` when
    `updates` is not the tree it was made for, or when a factored leaf is a shard inside
    :func:`jax.shard_map` (its row and column means would be this device's alone).
    """
    keys = _tree.leaf_keys(updates)
    paths_and_grads = _tree.leaves_with_paths(updates)
    if factoring is None:
        leaves = [LeafMoment(None, None, v, None) for v in _tree.leaves_like(updates, moment, name)]
    else:
        _tree.check_leaf_keys(keys, moment.v.keys, name)
        stats = zip(moment.v_row, moment.v_col, moment.v, strict=True)
        leaves = [
            LeafMoment(*leaf, _stored_axes(leaf, factoring, path, g.shape))
            for leaf, (path, g) in zip(stats, paths_and_grads, strict=True)
        ]
    _shards.check_whole_leaves(
        [g for (_, g), leaf in zip(paths_and_grads, leaves, strict=True) if leaf.axes is not None],
        name,
        "the factored row and column means",
        _shards.UNDER_JIT,
    )
    for key, (_, g), leaf in zip(keys, paths_and_grads, leaves, strict=True):
        leaf.check_shape(g.shape, name, key)
    return _tree.PerLeaf(leaves, keys)


def from_leaf_moments(
    leaves: tuple[LeafMoment, ...], like: Any, treedef: Any
) -> optax.Params | FactoredSecondMoment:
    """The inverse of :func:`leaf_moments`: a second moment laid out as `like`, the old one.

    `treedef` is the structure of the updates, for the full layout.
    """
    if not isinstance(like, FactoredSecondMoment):
        return _tree.unflatten_like(treedef, [leaf.full for leaf in leaves], like)
    columns = _tree.unzip([leaf[:3] for leaf in leaves], 3)
    return FactoredSecondMoment(*(_tree.PerLeaf(column, like.v.keys) for column in columns))
