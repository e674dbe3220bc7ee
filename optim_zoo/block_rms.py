"""Adafactor's per-block RMS building blocks: update clipping and the parameter scale.

Both give the values of their optax namesakes with less memory traffic on the update path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optim_zoo import _checks, _tree

# Leaves at least this large are clipped one after another (see clip_by_block_rms).
_SEQUENTIAL_CLIP_MIN_SIZE = 2**16


def clip_by_block_rms(threshold: jax.typing.ArrayLike) -> optax.GradientTransformation:
    r"""Scales each update leaf by :math:`1 / \max(1, \mathrm{rms}(u) / \text{threshold})`.

    Adafactor's update clipping, with the value of :func:`optax.clip_by_block_rms`. The RMS of
    an update that is computed from the gradient (as Adafactor's factored update is) needs that
    update in a temporary buffer as large as the leaf. Here the large leaves are measured one
    after another, so those buffers can share one piece of memory instead of all being live at
    once.

    Args:
      threshold: largest RMS let through.

    Returns:
      An :class:`optax.GradientTransformation` with empty state.
    """

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        clipped = []
        previous = None  # Sum of squares of the last large leaf measured.
        for u in leaves:
            # Squares summed in at least float32: a float16 sum overflows long before 2**16
            # elements of RMS 1 (optax accumulates in float32 too).
            measured = u.astype(_checks.stats_dtype(u.dtype))
            if u.size >= _SEQUENTIAL_CLIP_MIN_SIZE:
                if previous is not None:
                    # A sum of squares is never negative: `u`, measured after `previous`.
                    measured = jnp.where(previous < 0, jnp.zeros_like(measured), measured)
                previous = jnp.sum(jnp.square(measured))
                mean_square = previous / u.size
            else:
                mean_square = jnp.mean(jnp.square(measured))
            clip_denom = jnp.maximum(1.0, jnp.sqrt(mean_square) / threshold)
            clipped.append((u / clip_denom).astype(u.dtype))
        return treedef.unflatten(clipped), state

    return _tree.on_real_arrays(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        "clip_by_block_rms",
    )


def scale_by_param_rms(min_scale: jax.typing.ArrayLike = 1e-3) -> optax.GradientTransformation:
    r"""Scales each update by its parameter's RMS, :math:`\max(\text{min\_scale}, \mathrm{rms}(p))`.

    Adafactor's ``multiply_by_parameter_scale``. The value is that of
    :func:`optax.scale_by_param_block_rms`, which reduces over the parameter twice (the second
    time to keep the gradient of the RMS finite, which an optimizer update does not need); this
    reduces once.

    Args:
      min_scale: smallest scale, for parameters near zero.

    Returns:
      An :class:`optax.GradientTransformation` with empty state.
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_param_rms needs params.")

        def scale(u, p):
            rms = jnp.sqrt(jnp.mean(jnp.square(p.astype(_checks.stats_dtype(p.dtype)))))
            return (u * jnp.maximum(rms, min_scale)).astype(u.dtype)

        return jax.tree.map(scale, updates, params), state

    return _tree.on_real_arrays(
        optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn),
        "scale_by_param_rms",
    )
