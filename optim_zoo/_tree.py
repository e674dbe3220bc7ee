"""Small pytree helpers shared by the primitives."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_zoo import _codes, _dtypes


def is_params_placeholder(params: Any) -> bool:
    """True for the stand-in tree that :func:`optax.tree_map_params` calls ``init`` with.

    That stand-in has no leaves; ``init`` must return it wherever the state holds a tree like
    the params, and :class:`PerLeaf` fields then hold :data:`PER_LEAF_PLACEHOLDER`.
    """
    return type(params).__name__ == "_ParamsPlaceholder"


# What a PerLeaf field holds in the state `init` builds for optax.tree_map_params: a single
# leaf, so that the real field (a PerLeaf) counts as one non-parameter subtree there.
PER_LEAF_PLACEHOLDER = 0


# Flax's wrappers around a parameter: an NNX variable (`nnx.Param`; `VariableState` in older
# Flax) and a Linen box (`nn.Partitioned`, any `AxisMetadata`). Each holds its array as the
# attribute `value`, which `init` may see and `update` not: NNX hands `init` its variables and
# `update` the bare arrays, and Linen's boxes may be unboxed in between. Recognised by name, so
# that the package does not import Flax.
_FLAX_WRAPPERS = {"flax.nnx": ("Variable", "VariableState"), "flax.core": ("AxisMetadata",)}


@functools.cache
def _is_flax_wrapper_type(cls: type) -> bool:
    return any(
        c.__module__.startswith(prefix) and c.__name__ in names
        for c in cls.__mro__
        for prefix, names in _FLAX_WRAPPERS.items()
    )


def _is_flax_wrapper(x: Any) -> bool:
    return _is_flax_wrapper_type(type(x))


def leaves_with_paths(tree: Any) -> list[tuple[tuple, Any]]:
    """``(path, leaf)`` for each leaf of `tree`, in ``jax.tree.leaves`` order.

    The path is the leaf's key path, with the field names of NamedTuples, dataclasses and
    ``flax.struct`` classes, less the keys a Flax wrapper adds: an NNX variable or a Linen box
    (``['kernel'].value``) names its leaf as the bare array does (``['kernel']``).
    """
    if "flax" not in sys.modules:  # no Flax wrapper can be in the tree
        return jax.tree_util.tree_flatten_with_path(tree)[0]
    paths_and_leaves = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_flax_wrapper)[0]:
        if _is_flax_wrapper(x):
            # The wrapper's own key (`.value`) comes first in the paths of its leaves.
            inner = jax.tree_util.tree_flatten_with_path(x)[0]
            paths_and_leaves.extend((path + inner_path[1:], leaf) for inner_path, leaf in inner)
        else:
            paths_and_leaves.append((path, x))
    return paths_and_leaves


def leaf_keys(tree: Any) -> tuple[str, ...]:
    """The path of each leaf of `tree` (:func:`leaves_with_paths`), as a string."""
    return tuple(jax.tree_util.keystr(path) for path, _ in leaves_with_paths(tree))


@jax.tree_util.register_pytree_with_keys_class
class PerLeaf(tuple):
    """A tuple with one entry per parameter leaf, in ``jax.tree.leaves`` order.

    It remembers the leaves' keys (:func:`leaf_keys`) as static data, so that ``update`` can
    refuse a gradient tree other than the one ``init`` saw, as optax's own states do by their
    structure. Entries are arrays, or None where a leaf does not use the field.
    """

    keys: tuple[str, ...]

    def __new__(cls, entries: Iterable[Any], keys: Iterable[str]) -> PerLeaf:
        obj = super().__new__(cls, entries)
        obj.keys = tuple(keys)
        return obj

    def __reduce__(self):
        return (PerLeaf, (tuple(self), self.keys))

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.SequenceKey(i), x) for i, x in enumerate(self)], self.keys

    def tree_flatten(self):
        return tuple(self), self.keys

    @classmethod
    def tree_unflatten(cls, keys, children):
        return cls(children, keys)


def check_leaf_keys(keys: tuple[str, ...], expected: tuple[str, ...], name: str) -> None:
    """Raises `ValueError` when a gradient tree's leaf `keys` are not the `expected` ones."""
    if keys == expected:
        return
    missing = [k for k in expected if k not in keys]
    extra = [k for k in keys if k not in expected]
    detail = f"missing {missing}, unexpected {extra}" if missing or extra else "another order"
    raise _structure_mismatch(name, detail)


def check_leaf_shape(
    name: str, key: str, shape: Any, expected: Any, whose: str = "its state was initialised for"
) -> None:
    """Raises `ValueError` when the update of leaf `key` has `shape`, not the `expected` one.

    Broadcasting would otherwise let an update of shape (1,) train a state of shape (16,).
    """
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{name}: the update of {key or '(the root)'} has shape {tuple(shape)}, but {whose} "
            f"shape {tuple(expected)}."
        )


def check_shapes_like(name: str, updates: Any, tree: Any, whose: str) -> list[Any]:
    """The leaves of `tree` (a tree like `updates`), each array checked against its update.

    Raises `ValueError` naming `name` when the structures differ (:func:`leaves_like`) or when
    a leaf, a Python float included, has another shape than its update leaf
    (:func:`check_leaf_shape`); Python bools (weight-decay masks) are not arrays and pass.
    """
    leaves = leaves_like(updates, tree, name)
    for key, u, x in zip(leaf_keys(updates), jax.tree.leaves(updates), leaves, strict=True):
        if not isinstance(x, bool):
            check_leaf_shape(name, key, jnp.shape(u), jnp.shape(x), whose)
    return leaves


def _structure_mismatch(name: str, detail: Any) -> ValueError:
    return ValueError(
        f"{name}: the updates do not have the tree structure the state was initialised with "
        f"({detail})."
    )


def leaves_like(tree: Any, like: Any, name: str) -> list[Any]:
    """The leaves of `like`, a tree with the structure of `tree` (state fields like the params).

    A :class:`_codes.CodedState` of two Flax wrappers (:func:`_state_like`) is one leaf, of
    the bare codes and scales, where `tree` has one wrapper. Raises `ValueError` naming `name`
    when the structures differ.
    """
    treedef = jax.tree.structure(tree)
    try:
        return treedef.flatten_up_to(_coded_inside_wrappers(like))
    except (ValueError, TypeError) as error:
        raise _structure_mismatch(name, error) from None


def unflatten_like(treedef: Any, leaves: Sequence[Any], like: Any) -> Any:
    """`leaves` (a new state field, one per leaf of the updates of structure `treedef`) laid
    out as `like`, the field before this step: the inverse of :func:`leaves_like`.

    Where `like` holds 8-bit codes in Flax wrappers, each new :class:`_codes.CodedState` gets
    the wrappers of the old one back, metadata included; elsewhere this is
    ``treedef.unflatten(leaves)``.
    """
    tree = treedef.unflatten(leaves)
    if not _holds_coded_wrappers(like):
        return tree
    return jax.tree.structure(like).unflatten(jax.tree.leaves(tree))


def _is_coded(x: Any) -> bool:
    return isinstance(x, _codes.CodedState)


def _coded_in_wrappers(x: Any) -> bool:
    return _is_coded(x) and _is_flax_wrapper(x.codes)


def _holds_coded_wrappers(tree: Any) -> bool:
    return any(_coded_in_wrappers(x) for x in jax.tree.leaves(tree, is_leaf=_is_coded))


def _coded_inside_wrappers(tree: Any) -> Any:
    """`tree` with each :class:`_codes.CodedState` of two Flax wrappers turned inside out: the
    codes' wrapper around a ``CodedState`` of the bare arrays, as the params' tree has it."""
    if not _holds_coded_wrappers(tree):
        return tree

    def inside_out(x: Any) -> Any:
        if not _coded_in_wrappers(x):
            return x
        (codes,), treedef = jax.tree.flatten(x.codes)
        (scales,) = jax.tree.leaves(x.scales)
        return treedef.unflatten([_codes.CodedState(codes, scales)])

    return jax.tree.map(inside_out, tree, is_leaf=_is_coded)


def _to_real_pair(x: jax.Array) -> jax.Array:
    """A complex array of shape S as the real array of shape (2, *S): its real, imaginary parts."""
    return jnp.stack([jnp.real(x), jnp.imag(x)])


def _is_complex(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.complexfloating)


def _as_array(x: Any) -> Any:
    """A leaf as a real array: Python and NumPy scalars converted, complex as real pairs.

    Abstract leaves (``jax.ShapeDtypeStruct``, for an abstract ``init``) stay abstract.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not _is_complex(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((2, *x.shape), jnp.finfo(x.dtype).dtype)
    return _to_real_pair(x)


def _needs_conversion(tree: Any) -> bool:
    return any(
        not hasattr(x, "shape") or not hasattr(x, "dtype") or _is_complex(x)
        for x in jax.tree.leaves(tree)
    )


def _as_arrays(tree: Any) -> Any:
    return jax.tree.map(_as_array, tree) if _needs_conversion(tree) else tree


def _check_trainable(params: Any, name: str) -> None:
    """Raises `TypeError` naming the first leaf of `params` that `name` cannot train: an integer
    or boolean leaf, or a float that a step's arithmetic cannot take in (an 8-bit float)."""
    for path, leaf in leaves_with_paths(params):
        dtype = jnp.dtype(np.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype)
        where = jax.tree_util.keystr(path) or "(the root)"
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name} cannot train the {dtype.name} leaf {where}: gradient steps do not move "
                "integers or bools. Keep it out of the optimizer (optax.masked, or "
                "optax.multi_transform with optax.set_to_zero), or make it floating-point."
            )
        if not _dtypes.computes_with(dtype):
            raise TypeError(
                f"{name} cannot train the {dtype.name} leaf {where}: a step computes in at least "
                f"float32, which JAX does not promote {dtype.name} with. Train a float32 or "
                "bfloat16 copy of it and cast that to the narrow dtype where it is used."
            )


def on_real_arrays(
    transform: optax.GradientTransformation, name: str
) -> optax.GradientTransformation:
    """`transform`, made to take every kind of leaf a parameter tree can hold.

    * Python and NumPy scalars become jax arrays, as in :func:`optax.adam` (``{"t": 1.0}``).
    * Integer and boolean leaves are refused at ``init`` with a `TypeError` naming the leaf.
    * A complex leaf of shape ``S`` is trained as the real array of shape ``(2, *S)`` holding
      its real and imaginary parts, the convention of PyTorch's optimizers
      (``torch.view_as_real``): every elementwise statistic is kept per part, every norm, mean
      or RMS counts the two parts as two real numbers, and its state is that real array's
      state. Its update is complex again.

    A tree of jax arrays none of which is complex goes through untouched, so this costs
    nothing there; `name` is the transform's, for error messages.
    """

    def init_fn(params):
        if is_params_placeholder(params):
            return transform.init(params)
        _check_trainable(params, name)
        return transform.init(_as_arrays(params))

    def update_fn(updates, state, params=None):
        if not _needs_conversion(updates) and not _needs_conversion(params):
            return transform.update(updates, state, params)
        params = None if params is None else _as_arrays(params)
        real_updates, state = transform.update(_as_arrays(updates), state, params)

        def restore(new, old):
            if jnp.iscomplexobj(old):  # a complex jax array, or a Python complex
                return jax.lax.complex(new[0], new[1]).astype(jnp.result_type(old))
            return new

        return jax.tree.map(restore, real_updates, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def unzip(rows: list[tuple], num_columns: int) -> tuple[tuple, ...]:
    """The columns of `rows` as tuples; `num_columns` empty tuples when `rows` is empty."""
    if not rows:
        return ((),) * num_columns
    return tuple(tuple(column) for column in zip(*rows, strict=True))


def first_moment_zeros(params: Any, dtype_momentum: jnp.dtype | None) -> Any:
    """Zeros like `params`, in `dtype_momentum` or, when it is None, each parameter's dtype;
    int8: signed 8-bit codes where a leaf is large enough (:mod:`optim_zoo._codes`)."""
    return _state_like(
        params,
        lambda p: _codes.state_zeros(
            p, _dtypes.momentum_dtype(p.dtype, dtype_momentum), True, p.dtype
        ),
    )


def second_moment_zeros(
    params: Any, dtype_second_moment: jnp.dtype | None, signed: bool = False
) -> Any:
    """Zeros like `params`, in `dtype_second_moment` or, when it is None, at least float32;
    uint8: 8-bit codes where a leaf is large enough, signed for a statistic that takes both
    signs (`signed`), else at least float32."""
    return _state_like(
        params,
        lambda p: _codes.state_zeros(
            p,
            _dtypes.stats_dtype(p.dtype, dtype_second_moment),
            signed,
            _dtypes.stats_dtype(p.dtype),
        ),
    )


def _state_like(params: Any, fn: Any) -> Any:
    """``jax.tree.map(fn, params)``, where a Flax wrapper's 8-bit codes are two wrappers.

    An NNX variable or Linen box around an array stays around its state array, with its
    metadata (sharding names too), as ``jax.tree.map`` leaves it; around a
    :class:`_codes.CodedState` it would hold a pair Flax takes apart, so each of the codes and
    the scales gets a wrapper of its own instead (both have the parameter's rank). The scales'
    wrapper names no mesh axis for the last axis where the parameter's shards of it are not
    whole blocks (:func:`_codes.whole_last_axis`).
    """

    def leaf(x: Any) -> Any:
        if not _is_flax_wrapper(x):
            return fn(x)
        arrays, treedef = jax.tree.flatten(x)
        if len(arrays) != 1:
            return jax.tree.map(fn, x)
        state = fn(arrays[0])
        if isinstance(state, _codes.CodedState):
            scales = _with_whole_last_axis(treedef.unflatten([state.scales]), arrays[0])
            return _codes.CodedState(treedef.unflatten([state.codes]), scales)
        return treedef.unflatten([state])

    return jax.tree.map(leaf, params, is_leaf=_is_flax_wrapper)


# Where a Flax wrapper keeps the mesh axis names of its array's axes: NNX's metadata (the key
# differs between Flax versions), or a Linen ``Partitioned`` box's field.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding", "names")


def _with_whole_last_axis(wrapper: Any, param: jax.Array) -> Any:
    """`wrapper` (around the scales of `param`'s codes) with its last axis named by no mesh
    axis, where `param`'s sharding names split it into shards that are not whole blocks.

    The mesh is `param`'s (a concrete sharded array), the one ``jax.set_mesh`` set, or the
    wrapper's own (a Linen box's ``mesh``). Logical names (Linen's ``LogicallyPartitioned``, NNX's
    ``sharding_rules``) are read through their rules: the wrapper's and those Flax's
    ``logical_axis_rules`` set; without a mesh, or names no rule maps, it is left as it is.
    """
    get_metadata = getattr(wrapper, "get_metadata", None)  # NNX; a Linen box's fields else
    metadata = get_metadata() if get_metadata is not None else getattr(wrapper, "__dict__", {})
    mesh = getattr(getattr(param, "sharding", None), "mesh", None)
    if mesh is None:
        mesh = metadata.get("mesh")
    mesh_shape = (
        dict(mesh.shape) if mesh is not None else dict(jax.sharding.get_abstract_mesh().shape)
    )
    for key in _SHARDING_KEYS:
        names = metadata.get(key)
        if isinstance(names, (tuple, jax.sharding.PartitionSpec)):
            mesh_names = _mesh_axes(names, metadata.get("rules") or metadata.get("sharding_rules"))
            if _codes.whole_last_axis(param.shape, mesh_names, mesh_shape) is None:
                return wrapper
            last = len(param.shape) - 1
            whole = (*names[:last], None, *names[last + 1 :])
            if isinstance(names, jax.sharding.PartitionSpec):
                whole = jax.sharding.PartitionSpec(*whole)
            return wrapper.replace(**{key: whole})
    return wrapper


def _mesh_axes(names: Any, rules: Any) -> Any:
    """Sharding `names` with logical names renamed to mesh axes by `rules` and the rules of
    Flax's ``logical_axis_rules`` (as ``flax.core.spmd.apply_rules`` reads them)."""
    from flax.core import spmd  # a Flax wrapper is at hand, so Flax is loaded

    return tuple(spmd.apply_rules(tuple(names), rules))


def resolve_mask(mask: Any, params: Any) -> Any:
    """Returns the boolean mask tree for `params`: all True when `mask` is None."""
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask


def decayed_leaves(mask: Any, params: Any, decay: bool = True) -> Any:
    """One Python bool per leaf of `params`: True where weight decay applies.

    `mask` is a weight-decay mask as optax takes it (None, a tree of booleans that may be a
    prefix of the params tree, or a callable returning one); with `decay` False (a literal zero
    decay) every leaf is False.
    """
    mask = resolve_mask(mask, params)
    return jax.tree.map(
        lambda d, subtree: jax.tree.map(lambda _: bool(d) and decay, subtree), mask, params
    )
