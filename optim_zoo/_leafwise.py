"""The leaf-wise driver: everything a primitive's update does around its math, owned once.

A primitive declares its state fields (:class:`Field`) and gives the math of one leaf, a
function of a :class:`Leaf`; :func:`transform` builds the ``optax.GradientTransformation``. The
driver owns, for every primitive alike:

* the options of state storage, validated once: ``dtype_momentum``, ``dtype_second_moment``,
  ``state_rounding`` and its seed;
* ``init``: each field's zeros (or ones) in its storage dtype, laid out as its kind says;
* the step: the count, the params that weight decay reads (refused when missing) and the
  per-leaf decay mask, the tree, shape and shard checks, complex leaves
  (:func:`optim_zoo._tree.on_real_arrays`), the leaf walk with each leaf's path and index, and
  the new state;
* storage (:meth:`Leaf.store`, the one hook every stored value passes through): a field's
  storage dtype and its rounding, to nearest or stochastically, with a random stream of its own
  that follows from the field's place in the declaration, or 8-bit codes with a scale per block
  (:mod:`optim_zoo._codes`: int8 for ``dtype_momentum``, uint8 for ``dtype_second_moment``),
  decoded by :meth:`Leaf.old` for the arithmetic and encoded by :meth:`Leaf.store`;
* the compiler-steering switch (:func:`optim_zoo._fusion.steered`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _codes, _dtypes, _fusion, _shards, _tree, second_moment

# Field kinds: where a field's storage dtype and initial value come from.
MOMENTUM = "momentum"  # like the params; dtype_momentum, else the parameter's dtype; zeros
STATISTIC = "statistic"  # like the params; dtype_second_moment, else at least float32; zeros
SECOND_MOMENT = "second_moment"  # full or factored (second_moment.LeafMoment); as STATISTIC
PRODUCT = "product"  # like the params; at least float32 whatever the options; ones

# A second moment is stored as three statistics (row, column, full), each with its own stream.
_STREAMS = {MOMENTUM: 1, STATISTIC: 1, SECOND_MOMENT: 3, PRODUCT: 1}


class Field(NamedTuple):
    """One state field of a primitive: its name in the state and its kind.

    Fields are declared in the order the math stores them; each one's rounding stream is its
    place in that order (a second moment takes three places), so the bits of a field never
    depend on another primitive's fields.
    """

    name: str
    kind: str


class Storage(NamedTuple):
    """The storage options every primitive takes, validated."""

    dtype_momentum: jnp.dtype | None
    dtype_second_moment: jnp.dtype | None
    rounding: str
    seed: Any


def storage(
    dtype_momentum: Any = None,
    dtype_second_moment: Any = None,
    state_rounding: Any = "nearest",
    state_rounding_seed: Any = 0,
) -> Storage:
    """The storage options as a :class:`Storage`, each checked, naming its argument."""
    dtype_momentum = _checks.check_dtype("dtype_momentum", dtype_momentum)
    dtype_second_moment = _checks.check_second_moment_dtype(dtype_second_moment)
    _checks.check_state_rounding(state_rounding, state_rounding_seed)
    return Storage(dtype_momentum, dtype_second_moment, state_rounding, state_rounding_seed)


class Leaf:
    """One leaf of one step, as its math sees it.

    ``g`` is the update leaf in its own dtype, ``p`` the parameter (the update when no params
    were needed), ``decayed`` whether weight decay applies to it, ``dtype`` the dtype its math
    runs in (the widest of the update's and the state's, at least float32), ``t`` the step
    number in that dtype, ``earlier_steps`` the number of steps before it (an int32 scalar),
    ``is_first`` whether this is the first step. :meth:`old` reads a state
    field, :meth:`store` writes one.
    """

    def __init__(self, step: Step, index: int, path: str, g, p, decayed: bool, old: dict):
        self.index, self.path, self.g, self.p, self.decayed = index, path, g, p, decayed
        self._step, self._old, self._given, self._new = step, old, old, {}
        self._after: jax.Array | None = None
        self.dtype = _dtypes.compute_dtype(g.dtype, *(_dtype(x) for x in old.values()))
        self.t = step.count.astype(self.dtype)
        self.earlier_steps = step.old_count
        self.is_first = step.old_count == 0
        self._rounding = step.rounding.for_leaf(path)

    def old(self, name: str) -> Any:
        """Field `name` before this step, in the leaf's dtype (a ``LeafMoment`` for a moment)."""
        return self._old[name].astype(self.dtype)

    def old_for_reductions(self, name: str, count: int) -> list[jax.Array]:
        """Field `name` before this step, in the leaf's dtype, once for each of `count`
        reductions that read it (``_fusion.widened_for_reductions``), each computing it in its
        own loop: sums with :meth:`sum`, where 8-bit codes are decoded in the sum's."""
        return _fusion.widened_for_reductions(self._old[name], self.dtype, count, codes_apart=True)

    def sum(self, x: jax.Array, *names: str) -> jax.Array:
        """The sum of `x`, a value that reads fields `names`: ``jnp.sum``, or
        ``_fusion.coded_sum`` where one of them is stored as 8-bit codes."""
        coded = any(_holds_codes(self._old[name]) for name in names)
        return _fusion.coded_sum(x) if coded else jnp.sum(x)

    def mean_squares(
        self, fn: Callable[[jax.Array], jax.Array], axes: tuple[int, int] | None, name: str
    ) -> tuple[jax.Array, jax.Array] | None:
        """A factored statistic's two means of ``fn(x)**2`` over `axes`, `x` field `name` as
        stored this step (``_fusion.mean_squares``). Stored as 8-bit codes, each mean decodes
        it in its own loop (``_fusion.coded_mean_squares``)."""
        stored = self._new[name]
        if not isinstance(stored, _codes.CodedState):
            return _fusion.mean_squares(fn(stored.astype(self.dtype)), axes)
        x, y = _fusion.widened_for_reductions(stored, self.dtype, 2, codes_apart=True)
        return _fusion.coded_mean_squares(fn(x), axes, fn(y))

    def stored(self, name: str) -> Any:
        """Field `name` before this step, as stored."""
        return self._old[name]

    def new(self, name: str) -> Any:
        """Field `name` as this step stored it."""
        return self._new[name]

    def store(self, name: str, value: Any, after: Sequence[Any] = ()) -> Any:
        """Stores `value` as field `name`; returns it as stored, in the leaf's dtype.

        The one place a value becomes state: cast to the field's storage dtype, rounded to
        nearest or stochastically (from the seed, the step, the leaf's path and the field's
        stream). `after`: arrays, or names of fields stored already, that read the old value
        of this field; it is overwritten only once they exist (``_fusion.written_after``).
        """
        old, stream = self._old[name], self._step.streams[name]
        if isinstance(old, second_moment.LeafMoment):
            stored = value.stored_as(old, self._put, stream)
        else:
            stored = self._put(value, old, stream)
        if after:
            stored = _written_after(stored, self._reads(after))
        self._new[name] = stored
        return stored.astype(self.dtype)

    def _put(self, x: jax.Array, old: Any, stream: int) -> Any:
        """`x` stored as `old` is: in its dtype, or as 8-bit codes (``_codes.stored_like``)."""
        return _codes.stored_like(x, old, self._rounding, stream, self._after)

    def write_after(self, name: str, *reads: Any) -> None:
        """Field `name`, stored already, is overwritten only after `reads` (see :meth:`store`)."""
        self._new[name] = _written_after(self._new[name], self._reads(reads))

    def _reads(self, reads: Sequence[Any]) -> list[jax.Array]:
        arrays = []
        for read in reads:
            if not isinstance(read, str):
                arrays.append(read)
            elif isinstance(self._new[read], second_moment.LeafMoment):
                arrays.extend(self._new[read].broadcastable())
            else:
                arrays.append(self._new[read])
        # 8-bit codes: their reading is ordered by their codes, shaped like the leaf.
        return [x.codes if isinstance(x, _codes.CodedState) else x for x in arrays]

    def take_turn(self, turns: _fusion.InTurns) -> None:
        """This leaf's 8-bit fields read and their blocks' maxima computed in its turn
        (``_fusion.InTurns``)."""
        self._after = turns.after(self.g.size)
        self._old = {name: _codes.read_after(x, self._after) for name, x in self._old.items()}

    def holds_codes(self) -> bool:
        """Whether a field of this leaf is stored as 8-bit codes."""
        return any(_holds_codes(x) for x in self._given.values())

    def stored_reductions(self) -> list[jax.Array]:
        """What this step stored smaller than the leaf: the scales of 8-bit codes, factored
        statistics. Reductions compute them, which XLA does not recompute where they are read;
        the leaf's loops that feed them are done once they exist."""
        stored = jax.tree.leaves(self._new, is_leaf=lambda x: isinstance(x, _codes.CodedState))
        arrays = [x.scales if isinstance(x, _codes.CodedState) else x for x in stored]
        return [x for x in arrays if isinstance(x, jax.Array) and x.size < self.g.size]

    def state(self, name: str) -> Any:
        """Field `name` for the new state: as stored this step, else as it was."""
        return self._new.get(name, self._given[name])


def _holds_codes(x: Any) -> bool:
    """Whether a stored field (a second moment's full statistic) is 8-bit codes."""
    if isinstance(x, second_moment.LeafMoment):
        x = x.full
    return isinstance(x, _codes.CodedState)


def _written_after(stored: Any, reads: list[jax.Array]) -> Any:
    """``_fusion.written_after`` for a stored value: of its codes when it is 8-bit codes."""
    if isinstance(stored, _codes.CodedState):
        return stored._replace(codes=_fusion.written_after(stored.codes, *reads))
    return _fusion.written_after(stored, *reads)


def _dtype(x: Any) -> jnp.dtype | None:
    if isinstance(x, second_moment.LeafMoment):
        arrays = x.arrays()
        return _dtypes.compute_dtype(*(a.dtype for a in arrays)) if arrays else None
    return x.dtype


class Step:
    """What one step's leaves share: the counts, the rounding and the field streams."""

    def __init__(
        self, old_count: jax.Array, options: Storage, salt: int, streams: dict, in_turns: bool
    ):
        self.old_count = old_count
        self.count = optax.safe_increment(old_count)
        self.rounding = _dtypes.StateRounding(options.rounding, options.seed, self.count, salt)
        self.streams = streams
        self.in_turns = in_turns
        self.leaves: list[Leaf] = []

    def map(self, fn: Callable[..., Any], *columns: Sequence[Any]) -> list[Any]:
        """``fn(leaf, *row)`` for each leaf and the matching entries of `columns`; leaves with
        8-bit fields in turns (``_fusion.InTurns``) where the primitive takes them."""
        results, turns = [], _fusion.InTurns() if self.in_turns else None
        for leaf, *row in zip(self.leaves, *columns, strict=True):
            with _fusion.at_leaf(leaf.index):
                if turns is not None:
                    leaf.take_turn(turns)
                results.append(fn(leaf, *row))
                if turns is not None and leaf.holds_codes():
                    turns.done(leaf.g.size, leaf.stored_reductions())
        return results


def transform(
    name: str,
    state_type: type,
    fields: Sequence[Field],
    update: Callable[[Step], list[jax.Array]],
    options: Storage,
    *,
    factoring: second_moment.Factoring | None = None,
    factored_only: bool = False,
    weight_decay: Any = None,
    weight_decay_mask: Any = None,
    whole_leaves: str | None = None,
    in_turns: bool = True,
    to_state: Callable[[jax.Array, dict], Any] | None = None,
    from_state: Callable[[Any], dict] | None = None,
) -> optax.GradientTransformation:
    """The primitive `name`: its state a `state_type` of ``count`` and `fields`.

    `update(step)` runs the math, usually ``step.map(leaf_math)``, and returns one update leaf
    per leaf (in the leaf's dtype or wider; cast back here). `factoring` lays out the
    SECOND_MOMENT fields (None: full, a tree like the params), `factored_only` keeps no
    statistic for leaves not factored. `weight_decay` and its mask say which leaves read their
    parameter (None: the primitive takes no decay and ignores params; a literal zero: no leaf,
    and no params needed). `whole_leaves` names a per-tensor
    reduction that refuses leaves split inside ``shard_map``. `in_turns`: whether large leaves
    with 8-bit fields step in turns (``Step.map``). `to_state` and `from_state` map
    between the fields and a state laid out otherwise (default: ``state_type(count, **fields)``).
    """
    streams, position = {}, 0
    for field in fields:
        streams[field.name] = position
        position += _STREAMS[field.kind]
    salt = _dtypes.salt(name)
    no_decay = weight_decay is None or _checks.is_literal_zero(weight_decay)
    to_state = to_state or (lambda count, values: state_type(count=count, **values))
    from_state = from_state or (lambda state: {f.name: getattr(state, f.name) for f in fields})

    def init_field(field: Field, params: Any) -> Any:
        if field.kind == MOMENTUM:
            return _tree.first_moment_zeros(params, options.dtype_momentum)
        if field.kind == STATISTIC:  # a statistic may take both signs (Apollo's B)
            return _tree.second_moment_zeros(params, options.dtype_second_moment, signed=True)
        if field.kind == PRODUCT:  # never 8-bit codes (Adai's product of inertias)
            dtype = options.dtype_second_moment
            dtype = None if _codes.is_code_dtype(dtype) else dtype
            return jax.tree.map(
                lambda p: jnp.ones_like(p, _dtypes.compute_dtype(p.dtype, dtype)), params
            )
        return second_moment.init(
            params, factoring, options.dtype_second_moment, factored_only=factored_only
        )

    def init_fn(params: optax.Params) -> Any:
        values = {field.name: init_field(field, params) for field in fields}
        return to_state(jnp.zeros([], jnp.int32), values)

    def update_fn(updates: optax.Updates, state: Any, params: Any = None) -> tuple[Any, Any]:
        if params is None or weight_decay is None:  # the math reads no params
            if not no_decay:
                raise ValueError(f"{name} needs params for weight decay.")
            params = updates
        if whole_leaves is not None:
            _shards.check_whole_leaves(
                jax.tree.leaves(updates), name, whole_leaves, _shards.UNDER_JIT
            )
        values = from_state(state)
        columns = {}
        for field in fields:
            if field.kind == SECOND_MOMENT:
                columns[field.name] = second_moment.leaf_moments(
                    values[field.name], updates, factoring, name
                )
        for field in fields:
            if field.kind != SECOND_MOMENT:
                columns[field.name] = _tree.check_shapes_like(
                    name, updates, values[field.name], "its state (or its parameter) has"
                )
        param_leaves = _tree.check_shapes_like(
            name, updates, params, "its state (or its parameter) has"
        )
        decayed = jax.tree.leaves(_tree.decayed_leaves(weight_decay_mask, params, not no_decay))
        paths = _tree.leaf_keys(updates)
        grads, treedef = jax.tree.flatten(updates)

        def run() -> tuple[Any, Any]:
            step = Step(state.count, options, salt, streams, in_turns)
            for i, (path, g, p, d) in enumerate(
                zip(paths, grads, param_leaves, decayed, strict=True)
            ):
                old = {f.name: columns[f.name][i] for f in fields}
                step.leaves.append(Leaf(step, i, path, g, p, d, old))
            out = update(step)
            new_values = {}
            for field in fields:
                column = [leaf.state(field.name) for leaf in step.leaves]
                if field.kind == SECOND_MOMENT:
                    new_values[field.name] = second_moment.from_leaf_moments(
                        column, values[field.name], treedef
                    )
                else:
                    new_values[field.name] = _tree.unflatten_like(
                        treedef, column, values[field.name]
                    )
            scaled = [u.astype(g.dtype) for u, g in zip(out, grads, strict=True)]
            return treedef.unflatten(scaled), to_state(step.count, new_values)

        return _fusion.steered(run, state.count, state.count)

    return _tree.on_real_arrays(optax.GradientTransformation(init_fn, update_fn), name)
