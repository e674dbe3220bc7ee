"""The building blocks the optimizers chain around their primitives.

Adafactor's per-tensor RMS clip and parameter scale, Adan's global-norm clip and proximal
learning rate, and the two small adapters of optax blocks that the optimizers need.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _codes, _dtypes, _fusion, _shards, _tree

# Leaves at least this large are clipped one after another (see clip_by_block_rms).
_SEQUENTIAL_CLIP_MIN_SIZE = 2**16


def clip_by_block_rms(threshold: jax.typing.ArrayLike) -> optax.GradientTransformation:
    r"""Scales each update leaf by :math:`1 / \max(1, \mathrm{rms}(u) / \text{threshold})`.

    Adafactor's update clipping, with the value of :func:`optax.clip_by_block_rms`. The RMS of
    an update that is computed from the gradient (as Adafactor's factored update is) needs that
    update in a temporary buffer as large as the leaf. Here the large leaves are measured one
    after another, so those buffers can share one piece of memory instead of all being live at
    once. Squares are summed in at least float32. Inside :func:`jax.shard_map` a leaf split over
    its axes raises a ``ValueError`` (its RMS would be one device's shard's).

    Args:
      threshold: largest RMS let through; > 0.

    Returns:
      An :class:`optax.GradientTransformation` with empty state.
    """
    _checks.check_interval("threshold", threshold, 0.0, low_open=True)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        _shards.check_whole_leaves(
            leaves, "clip_by_block_rms", "each leaf's RMS", _shards.UNDER_JIT
        )

        def clip():
            clipped = []
            previous = None  # Sum of squares of the last large leaf measured.
            for u in leaves:
                # Squares summed in at least float32: a float16 sum overflows long before 2**16
                # elements of RMS 1 (optax accumulates in float32 too).
                measured = u.astype(_dtypes.stats_dtype(u.dtype))
                if u.size >= _SEQUENTIAL_CLIP_MIN_SIZE:
                    if previous is not None:
                        measured = _fusion.measured_after(measured, previous)
                    previous = jnp.sum(jnp.square(measured))
                    mean_square = previous / u.size
                else:
                    mean_square = jnp.mean(jnp.square(measured))
                clip_denom = jnp.maximum(1.0, jnp.sqrt(mean_square) / threshold)
                clipped.append((u / clip_denom).astype(u.dtype))
            return treedef.unflatten(clipped)

        return _fusion.steered(clip, None, leaves), state

    return _tree.on_real_arrays(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        "clip_by_block_rms",
    )


def scale_by_param_rms(min_scale: jax.typing.ArrayLike = 1e-3) -> optax.GradientTransformation:
    r"""Scales each update by its parameter's RMS, :math:`\max(\text{min_scale}, \mathrm{rms}(p))`.

    Adafactor's ``multiply_by_parameter_scale``. The value is that of
    :func:`optax.scale_by_param_block_rms`, which reduces over the parameter twice (the second
    time to keep the gradient of the RMS finite, which an optimizer update does not need); this
    reduces once. Inside :func:`jax.shard_map` a parameter split over its axes raises a
    ``ValueError``.

    Args:
      min_scale: smallest scale, for parameters near zero; >= 0.

    Returns:
      An :class:`optax.GradientTransformation` with empty state.
    """
    _checks.check_interval("min_scale", min_scale, 0.0)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_param_rms needs params.")
        _shards.check_whole_leaves(
            jax.tree.leaves(params), "scale_by_param_rms", "each parameter's RMS", _shards.UNDER_JIT
        )

        _tree.check_shapes_like("scale_by_param_rms", updates, params, "its parameter has")

        def scale(u, p):
            rms = jnp.sqrt(jnp.mean(jnp.square(p.astype(_dtypes.stats_dtype(p.dtype)))))
            return (u * jnp.maximum(rms, min_scale)).astype(u.dtype)

        return jax.tree.map(scale, updates, params), state

    return _tree.on_real_arrays(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        "scale_by_param_rms",
    )


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike, eps: jax.typing.ArrayLike = 0.0
) -> optax.GradientTransformation:
    r"""Scales all updates by :math:`\min(1, \mathrm{max\_norm} / (\lVert g \rVert_2 + \epsilon))`.

    This is the official Adan clip (``max_grad_norm``): one factor from the norm over every leaf,
    with ``eps`` in the denominator. With ``eps=0`` it equals :func:`optax.clip_by_global_norm`.
    The norm is accumulated in at least float32. Inside :func:`jax.shard_map` a leaf split over
    its axes raises a ``ValueError`` (the norm would be one device's).

    Args:
      max_norm: largest global norm let through; > 0.
      eps: added to the norm in the denominator; >= 0.

    Returns:
      An :class:`optax.GradientTransformation` with empty state.
    """
    _checks.check_interval("max_norm", max_norm, 0.0, low_open=True)
    _checks.check_interval("eps", eps, 0.0)

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        _shards.check_whole_leaves(
            leaves, "clip_by_global_norm", "the global norm", _shards.UNDER_JIT
        )
        squares = [jnp.sum(jnp.square(g.astype(_dtypes.stats_dtype(g.dtype)))) for g in leaves]
        norm = jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))
        factor = jnp.minimum(max_norm / (norm + eps), 1.0)
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

    return _tree.on_real_arrays(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        "clip_by_global_norm",
    )


class ScaleByProximalLearningRateState(NamedTuple):
    """State of :func:`scale_by_proximal_learning_rate`."""

    count: jax.Array  # shape (), int32: steps taken, the learning-rate schedule's argument.


def scale_by_proximal_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: jax.typing.ArrayLike,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    r"""Turns ``direction + weight_decay * p`` into Adan's proximal (default) step.

    The official Adan applies weight decay as a proximal step,
    :math:`p_{t+1} = (p_t - \eta_t u_t) / (1 + \eta_t \lambda)`. Given the incoming update
    :math:`u_t + \lambda p_t` (from :func:`optax.add_decayed_weights`), this scales it by
    :math:`-\eta_t / (1 + \eta_t \lambda)`, which yields exactly that step. Leaves that the mask
    excludes from decay are scaled by :math:`-\eta_t` alone.

    Args:
      learning_rate: a float or an optax schedule of the step count.
      weight_decay: the decay rate :math:`\lambda`; >= 0.
      weight_decay_mask: a tree of booleans like the params (or a callable returning one):
        True where decay applies. None means everywhere.

    Returns:
      An :class:`optax.GradientTransformation`.
    """
    _checks.check_learning_rate(learning_rate)
    _checks.check_interval("weight_decay", weight_decay, 0.0)
    _checks.check_not_scheduled("weight_decay_mask", weight_decay_mask)

    def init_fn(params):
        del params
        return ScaleByProximalLearningRateState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        proximal_factor = -lr / (1 + lr * weight_decay)
        mask = _tree.resolve_mask(weight_decay_mask, updates if params is None else params)

        def scale_subtree(decayed, subtree):
            factor = proximal_factor if decayed else -lr
            return jax.tree.map(lambda u: (u * factor).astype(u.dtype), subtree)

        updates = jax.tree.map(scale_subtree, mask, updates)
        return updates, ScaleByProximalLearningRateState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(
    weight_decay: jax.typing.ArrayLike, weight_decay_mask: Any
) -> optax.GradientTransformation:
    """:func:`optax.add_decayed_weights`, which a literal zero decay lets run without params.

    A decay of exactly zero adds nothing, so ``update`` may then be called without params, as
    for :func:`optax.adam`; given params, it computes what ``add_decayed_weights`` computes,
    after checking that each parameter has its update's shape (optax's would broadcast). A jax
    array (as ``inject_hyperparams`` passes) always needs them. Like optax's, it does not
    validate `weight_decay`: the optimizers do, under their argument's name. A callable mask
    that ``inject_hyperparams`` took for a schedule is refused (optax's would decay as its value
    at the step count says, a mask of no leaf or of every leaf).
    """
    _checks.check_not_scheduled("weight_decay_mask", weight_decay_mask)
    decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)
    zero = _checks.is_literal_zero(weight_decay)

    def update_fn(updates, state, params=None):
        if params is None and zero:
            return updates, state
        if params is not None:
            _tree.check_shapes_like("add_decayed_weights", updates, params, "its parameter has")
        return decay.update(updates, state, params)

    return optax.GradientTransformation(decay.init, update_fn)


def momentum_of_steps(
    decay: jax.typing.ArrayLike,
    dtype_momentum: jnp.dtype | None,
    state_rounding: str = "nearest",
    state_rounding_seed: int = 0,
) -> optax.GradientTransformation:
    """Adafactor's momentum: :func:`optax.ema` of the steps, without debiasing.

    The accumulator is kept in `dtype_momentum` (None: the update's dtype), and the updates come
    out in the dtype they came in with (`optax.ema` returns its accumulator, so a float32
    momentum would turn bfloat16 updates into float32 ones). On real pairs, so that a float32
    accumulator keeps both parts of a complex step. With ``state_rounding="stochastic"`` a
    narrower accumulator is stored with stochastic rounding (``_dtypes.StateRounding``).
    ``jnp.int8``: 8-bit codes (:mod:`optim_zoo._codes`), :func:`_coded_momentum_of_steps`.
    """
    _checks.check_state_rounding(state_rounding, state_rounding_seed)
    if _codes.is_code_dtype(dtype_momentum):
        return _tree.on_real_arrays(
            _coded_momentum_of_steps(decay, state_rounding, state_rounding_seed), "adafactor"
        )
    ema = optax.ema(decay, debias=False, accumulator_dtype=dtype_momentum)

    def update_fn(updates, state, params=None):
        new_updates, new_state = ema.update(updates, state, params)
        if state_rounding == "stochastic":
            # Without debiasing, optax.ema's updates are its accumulator before the cast.
            rounding = _dtypes.StateRounding(
                state_rounding,
                state_rounding_seed,
                new_state.count,
                _dtypes.salt("adafactor_momentum"),
            )
            leaves, treedef = jax.tree.flatten(new_updates)
            paths = _tree.leaf_keys(new_updates)
            casts = jax.tree.leaves(new_state.ema)
            stored = [
                rounding.for_leaf(path).store(x, cast.dtype, 0)
                for path, x, cast in zip(paths, leaves, casts, strict=True)
            ]
            new_state = new_state._replace(ema=treedef.unflatten(stored))
        return optax.tree.cast_like(new_updates, updates), new_state

    return _tree.on_real_arrays(optax.GradientTransformation(ema.init, update_fn), "adafactor")


def _coded_momentum_of_steps(
    decay: jax.typing.ArrayLike, state_rounding: str, state_rounding_seed: int
) -> optax.GradientTransformation:
    """:func:`momentum_of_steps` with the accumulator as 8-bit codes where a leaf is large
    enough (the parameter's dtype elsewhere): ``optax.ema``'s state and arithmetic, in at least
    float32, the accumulator decoded when read and encoded when stored.

    Where a leaf is coded, the update is the new accumulator as stored (decoded), as every
    primitive's step reads its stored state (``_leafwise.Leaf.store``), not ``optax.ema``'s
    value before the cast: read that way, XLA:CPU copied each leaf's old codes out before
    overwriting them (the step 1.25x as long, docs/eight_bit_state.md)."""

    def init_fn(params):
        return optax.EmaState(jnp.zeros([], jnp.int32), _tree.first_moment_zeros(params, jnp.int8))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        olds = _tree.leaves_like(updates, state.ema, "adafactor")
        paths = _tree.leaf_keys(updates)

        def run():  # traced once for each setting of the steering: its own rounding bits
            rounding = _dtypes.StateRounding(
                state_rounding, state_rounding_seed, count, _dtypes.salt("adafactor_momentum")
            )
            new_updates, stored, turns = [], [], _fusion.InTurns()
            for path, u, old in zip(paths, leaves, olds, strict=True):
                _tree.check_leaf_shape("adafactor", path, u.shape, old.shape)
                dtype = _dtypes.compute_dtype(u.dtype, old.dtype)
                after = turns.after(u.size)
                old_value = _codes.read_after(old, after).astype(dtype)
                new = decay * old_value + (1 - decay) * u.astype(dtype)
                stored.append(_codes.stored_like(new, old, rounding.for_leaf(path), 0, after))
                if isinstance(old, _codes.CodedState):
                    # The update is the momentum as stored: the old codes are then read only
                    # before the new ones overwrite them (no copy of the old codes).
                    new = stored[-1].astype(dtype)
                    turns.done(u.size, [stored[-1].scales])
                new_updates.append(new.astype(u.dtype))
            return treedef.unflatten(new_updates), _tree.unflatten_like(treedef, stored, state.ema)

        new_updates, stored = _fusion.steered(run, state.count, state.count)
        return new_updates, optax.EmaState(count, stored)

    return optax.GradientTransformation(init_fn, update_fn)


def state_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx`'s state, and updates passed through unchanged: a place kept in a chain.

    For a transform whose work moved into another one of the chain, so that the chain's state
    keeps its layout and checkpoints of earlier versions restore.
    """

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(tx.init, update_fn)
